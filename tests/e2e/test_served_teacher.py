"""The served teacher against a real vLLM server (its CPU build): the cache captured from it equals the local
teacher's, a run from the server equals a run from the cache, a server SIGKILLed mid-run leaves a checkpoint the
run resumes from exactly, and every refusal is one line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import checkout_env, run_flags, save_model
from llmneo import cli
from llmneo.demo.tiny import build_tiny_llama
from llmneo.teacher.cache import TeacherCache
from vllm_server import VllmServer, free_port

pytestmark = pytest.mark.e2e
TOP_K = 8
LLM_NEO = str(Path(sys.executable).parent / "llm-neo")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny teacher vLLM's CPU kernels take (head size 32), on the tests' tokenizer."""
    return save_model(tmp_path_factory.mktemp("served") / "teacher",
                      build_tiny_llama(tokenizer, hidden_size=64, num_heads=2, seed=5), tokenizer)


@pytest.fixture(scope="module")
def server(teacher_dir, tmp_path_factory):
    """One vLLM server for the module, serving the teacher under two names (two models, for the refusal test)."""
    vllm = VllmServer(teacher_dir, None, "--served-model-name", "teacher", "teacher-copy",
                      log=tmp_path_factory.mktemp("vllm") / "server.log").start()
    yield vllm
    vllm.stop()


def served_flags(models_dir, train_file, out, server_url, **extra) -> list[str]:
    """A neo run's flags with the served teacher in place of the local one."""
    flags = run_flags(models_dir, train_file, out, **extra)
    at = flags.index("--teacher_model")
    del flags[at:at + 2]
    return [*flags, "--teacher_server", server_url, "--teacher_server_model", "teacher", "--teacher_top_k", str(TOP_K)]


def losses(run_dir: Path) -> list[float]:
    """loss, ce_loss and kd_loss of every logged step, in order."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in lines if "kd_loss" in row for key in ("loss", "ce_loss", "kd_loss")]


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def llm_neo(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([LLM_NEO, *args], capture_output=True, text=True, timeout=timeout, env=checkout_env())


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if ": error: " in line]


def test_served_cache_and_run_equal_the_local_teacher(models_dir, train_file, teacher_dir, server, tmp_path):
    """Cache from the server == cache from the local teacher (ids equal, log-probs 1e-4); runs from either cache
    and from the server itself log the same losses and train the same adapter."""
    common = ["--top_k", str(TOP_K), "--cache_dtype", "float32", "--shard_rows", "16"]
    local = run_flags(models_dir, train_file, tmp_path / "unused", teacher=teacher_dir)
    assert cli.main(["cache-teacher", "--cache_dir", str(tmp_path / "local"), *common, *local]) == 0
    served = served_flags(models_dir, train_file, tmp_path / "unused", server.url)
    assert cli.main(["cache-teacher", "--cache_dir", str(tmp_path / "served"), *common,
                     "--teacher_server_concurrency", "4", *served]) == 0
    rows = range(48)
    mine, theirs = TeacherCache(tmp_path / "local").rows(rows), TeacherCache(tmp_path / "served").rows(rows)
    assert torch.equal(mine.token_ids, theirs.token_ids)
    assert (mine.log_probs - theirs.log_probs).abs().max() <= 1e-4
    assert (mine.log_tail - theirs.log_tail).abs().max() <= 1e-4

    runs = {}
    for name, flags in {"local_cache": run_flags(models_dir, train_file, tmp_path / "local_cache",
                                                 teacher_cache=tmp_path / "local"),
                        "served_cache": run_flags(models_dir, train_file, tmp_path / "served_cache",
                                                  teacher_cache=tmp_path / "served"),
                        "served": served_flags(models_dir, train_file, tmp_path / "served_run", server.url)}.items():
        if name != "served":  # a cache run names no teacher model
            at = flags.index("--teacher_model")
            del flags[at:at + 2]
        assert cli.main(["distill", *flags]) == 0
        runs[name] = Path(flags[flags.index("--output_dir") + 1])
    reference = losses(runs["local_cache"])
    assert len(reference) == 3 * 3
    for name in ("served_cache", "served"):
        assert losses(runs[name]) == pytest.approx(reference, rel=1e-4, abs=1e-6), name
        assert max_difference(adapter(runs[name]), adapter(runs["local_cache"])) <= 1e-4, name
    logged = [json.loads(line) for line in (runs["served"] / "metrics.jsonl").read_text().splitlines()]
    assert all(row["teacher_wait_s"] >= 0 for row in logged if "kd_loss" in row)


def test_refusals_are_one_line(models_dir, train_file, server, tmp_path):
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    cases = {
        "down": (served_flags(models_dir, train_file, tmp_path / "down", nowhere), [nowhere, "not reachable"]),
        "k": (served_flags(models_dir, train_file, tmp_path / "k", server.url) + ["--teacher_top_k", "65"],
              ["--teacher_top_k 65", "(64)", "--max-logprobs 65"]),
        "two": ([arg for arg in served_flags(models_dir, train_file, tmp_path / "two", server.url)
                 if arg not in ("--teacher_server_model", "teacher")], ["serves 2 models", "teacher-copy"]),
        "tokenizer": (served_flags({**models_dir, "student": models_dir["teacher_other_tokenizer"]}, train_file,
                                   tmp_path / "tokenizer", server.url), ["another tokenizer", "--cross_tokenizer"]),
    }
    for name, (flags, expected) in cases.items():
        result = llm_neo("distill", *flags)
        assert result.returncode == 1, (name, result.stderr)
        lines = error_lines(result)
        assert len(lines) == 1 and "\n" not in lines[0], (name, result.stderr)
        assert all(text in lines[0] for text in expected), (name, lines[0])
        assert "Loading weights" not in result.stderr, (name, "the student loaded before the refusal")
        assert not (tmp_path / name / "adapter").exists()


def test_server_killed_mid_run_then_resumed_equals_uninterrupted(models_dir, train_file, server, tmp_path):
    steps = ["--max_steps", "30", "--save_steps", "3", "--save_strategy", "steps", "--teacher_server_retries", "1",
             "--teacher_server_timeout", "10"]
    whole = served_flags(models_dir, train_file, tmp_path / "whole", server.url)
    assert cli.main(["distill", *whole, *steps]) == 0

    cut = tmp_path / "cut"
    flags = [*served_flags(models_dir, train_file, cut, server.url), *steps]
    run = subprocess.Popen([LLM_NEO, "distill", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=checkout_env())
    while not (cut / "checkpoint-6").is_dir() and run.poll() is None:
        time.sleep(0.05)
    server.kill()
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 1, stderr
    message = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(message) == 1, stderr
    assert "Resume with: llm-neo distill" in message[0] and "--resume_from_checkpoint latest" in message[0], message
    resume = message[0].split("Resume with: llm-neo ", 1)[1].split()

    server.start()
    result = llm_neo(*resume)
    assert result.returncode == 0, result.stderr
    assert max_difference(adapter(cut), adapter(tmp_path / "whole")) <= 1e-5
    assert losses(cut) == pytest.approx(losses(tmp_path / "whole"), rel=1e-5, abs=1e-7)


def test_on_policy_sampled_from_the_server_equals_the_local_teacher(models_dir, train_file, teacher_dir, server,
                                                                    tmp_path):
    """On-policy `sampled` steps read the teacher's log-probability of each token the student sampled: from the
    server (vLLM's own-token entry of prompt_logprobs) as from the local teacher. (Off-policy steps differ by
    design: the server gives the top-k, the local teacher its whole distribution.)"""
    on_policy = ["--on_policy_fraction", "1", "--on_policy_loss", "sampled", "--rollout_max_new_tokens", "8",
                 "--max_steps", "4"]
    local = run_flags(models_dir, train_file, tmp_path / "local", teacher=teacher_dir)
    assert cli.main(["distill", *local, *on_policy]) == 0
    served = served_flags(models_dir, train_file, tmp_path / "served", server.url)
    assert cli.main(["distill", *served, *on_policy]) == 0
    assert losses(tmp_path / "served") == pytest.approx(losses(tmp_path / "local"), rel=1e-4, abs=1e-6)
    assert max_difference(adapter(tmp_path / "served"), adapter(tmp_path / "local")) <= 1e-4
