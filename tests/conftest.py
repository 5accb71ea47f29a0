"""Session fixtures: tiny Llama teachers/students and a BPE tokenizer trained on the shipped corpus, saved with
`save_pretrained` so the real `from_pretrained` paths run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from llmneo.demo.tiny import build_tiny_llama, build_tokenizer, corpus_rows, corpus_texts  # noqa: E402


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
