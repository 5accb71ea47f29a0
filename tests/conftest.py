"""Session fixtures: tiny Llama teachers/students and a BPE tokenizer trained on the shipped corpus, saved with
`save_pretrained` so the real `from_pretrained` paths run; the test markers; the environment of subprocesses.

Markers: ``e2e`` (trains, spawns processes or runs a command end to end; ``pytest -m "not e2e"`` is the unit layer)
and ``gpu`` (needs CUDA: skipped without it). ``requires_liger`` tests skip when liger-kernel is absent, except in
CI (``CI=true``), where its absence is an error: the README's install command installs it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from llmneo.demo.tiny import build_char_tokenizer, build_tiny_llama, build_tokenizer, corpus_rows, corpus_texts  # noqa: E402


TESTS_DIR = Path(__file__).resolve().parent
SOURCE_DIR = TESTS_DIR.parent / "src"


def checkout_env(**extra: str) -> dict:
    """The environment for a subprocess that must import this checkout's llmneo (and the tests' helpers), not
    whatever llmneo is installed."""
    paths = [str(SOURCE_DIR), str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "requires_liger" in item.keywords:
            _require_liger(item)


def _require_liger(item) -> None:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except ModuleNotFoundError:
        if os.environ.get("CI", "").lower() == "true":
            raise RuntimeError("liger-kernel is missing in CI: the README's install command must install it") from None
        item.add_marker(pytest.mark.skip(reason="liger-kernel is not installed (pip install --no-deps liger-kernel)"))


def save_model(path: Path, model, tokenizer) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(corpus_texts())


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tokenizer):
    """Saved tiny models: student, teacher, padded-vocabulary teacher, teacher with another tokenizer."""
    root = tmp_path_factory.mktemp("models")
    other = build_tokenizer(corpus_texts()[::-1][:500], vocab_size=len(tokenizer))
    paths = {
        "student": save_model(root / "student", build_tiny_llama(tokenizer, hidden_size=32, seed=1), tokenizer),
        "teacher": save_model(root / "teacher", build_tiny_llama(tokenizer, hidden_size=48, seed=2), tokenizer),
        "teacher_padded": save_model(
            root / "teacher_padded", build_tiny_llama(tokenizer, hidden_size=48, seed=3, vocab_size=len(tokenizer) + 16),
            tokenizer),
        "teacher_other_tokenizer": save_model(
            root / "teacher_other", build_tiny_llama(other, hidden_size=48, seed=4), other),
    }
    return paths


@pytest.fixture(scope="session")
def char_teacher(tmp_path_factory):
    """A tiny teacher on a character-level, ▁-convention tokenizer without a chat template (another tokenizer
    than the student's, for --cross_tokenizer)."""
    tokenizer = build_char_tokenizer(corpus_texts())
    return save_model(tmp_path_factory.mktemp("char") / "teacher", build_tiny_llama(tokenizer, hidden_size=48, seed=5),
                      tokenizer)


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in corpus_rows()[:48]), encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows),
                    encoding="utf-8")
    return str(path)


def run_flags(models: dict, data: str, out: Path, method: str = "neo", **extra) -> list[str]:
    flags = ["--method", method, "--student_model", models["student"], "--dataset", data, "--output_dir", str(out),
             "--lora_r", "4", "--max_steps", "3", "--per_device_train_batch_size", "4", "--logging_steps", "1",
             "--learning_rate", "1e-2", "--disable_tqdm", "true", "--seed", "0", "--max_length", "64"]
    if method in ("kd", "neo"):
        flags += ["--teacher_model", extra.pop("teacher", models["teacher"])]
    for key, value in extra.items():
        flags += [f"--{key}", str(value)]
    return flags
