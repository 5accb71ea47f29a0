"""The fused chunked head against the naive path (full logits from lm_head, then the loss): values, gradients,
memory, and whole training runs."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import checkout_env, run_flags, save_model
from llmneo.config import parse_config
from llmneo.demo.tiny import build_tiny_llama
from llmneo.errors import ConfigError
from llmneo.losses.backends import choose_loss_impl
from llmneo.losses.contract import LossSettings
from llmneo.losses.reference import distillation_loss
from llmneo.losses.divergences import DIVERGENCES, get_divergence
from llmneo.losses.fused import fused_distillation_loss
from llmneo.losses.liger import liger_distillation_loss
from llmneo.losses import backends as backends_module
from llmneo.pipeline import distill

BATCH, LENGTH, HIDDEN, TEACHER_HIDDEN, VOCAB = 3, 8, 16, 24, 29
STUDENT_VOCAB = VOCAB + 3  # a student head padded past the shared vocabulary


def make_case(seed=0):
    """Hidden states and heads for both models, and labels with a prompt, padding and interleaved answers:
    14 answer positions in all."""
    generator = torch.Generator().manual_seed(seed)
    case = {
        "student_hidden": torch.randn(BATCH, LENGTH, HIDDEN, generator=generator),
        "student_weight": torch.randn(STUDENT_VOCAB, HIDDEN, generator=generator) * 0.5,
        "teacher_hidden": torch.randn(BATCH, LENGTH, TEACHER_HIDDEN, generator=generator),
        "teacher_weight": torch.randn(VOCAB + 5, TEACHER_HIDDEN, generator=generator) * 0.5,
    }
    labels = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)
    labels[0, :3] = -100  # prompt
    labels[1, 6:] = -100  # padding
    labels[2, ::2] = -100  # two answer turns
    assert int((labels[:, 1:] != -100).sum()) == 14
    return case, labels


def leaves(case, train_weight):
    hidden = case["student_hidden"].clone().requires_grad_(True)
    weight = case["student_weight"].clone().requires_grad_(train_weight)
    return hidden, weight


def loss_options(settings: dict) -> dict:
    """A call's LossSettings (over the shared vocabulary) and its num_items, from flat keywords."""
    settings = dict(settings)
    num_items = settings.pop("num_items", None)
    return {"settings": LossSettings(kd_vocab_size=VOCAB, **settings), "num_items": num_items}


def naive_path(case, labels, train_weight, **settings):
    hidden, weight = leaves(case, train_weight)
    teacher_logits = F.linear(case["teacher_hidden"], case["teacher_weight"])
    parts = distillation_loss(F.linear(hidden, weight), labels, teacher_logits, **loss_options(settings))
    parts.loss.backward()
    return parts, hidden.grad, weight.grad


def fused_path(case, labels, train_weight, teacher_as_logits=False, **settings):
    hidden, weight = leaves(case, train_weight)
    teacher = {"teacher_hidden": case["teacher_hidden"], "teacher_weight": case["teacher_weight"]}
    if teacher_as_logits:
        teacher = {"teacher_logits": F.linear(case["teacher_hidden"], case["teacher_weight"])}
    parts = fused_distillation_loss(hidden, weight, labels, **teacher, **loss_options(settings))
    parts.loss.backward()
    return parts, hidden.grad, weight.grad


def assert_same(ours, reference):
    (parts, hidden_grad, weight_grad), (ref_parts, ref_hidden_grad, ref_weight_grad) = ours, reference
    for name in ("loss", "ce", "kd"):
        torch.testing.assert_close(getattr(parts, name), getattr(ref_parts, name), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden_grad, ref_hidden_grad, rtol=1e-5, atol=1e-5)
    if ref_weight_grad is None:
        assert weight_grad is None
    else:
        torch.testing.assert_close(weight_grad, ref_weight_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [7, 5, 64])  # divides the 14 answer tokens, does not, one chunk
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_fused_equals_naive(name, alpha, temperature, chunk_size):
    case, labels = make_case()
    settings = {"alpha": alpha, "temperature": temperature, "chunk_size": chunk_size,
                "divergence": get_divergence(name, jsd_beta=0.3, skew_lambda=0.2)}
    train_weight = chunk_size != 64  # a trained head (sft, kd) and a frozen one (lora, neo)
    assert_same(fused_path(case, labels, train_weight, **settings), naive_path(case, labels, train_weight, **settings))


@pytest.mark.parametrize("name", ["forward_kl", "akl"])
def test_teacher_given_as_logits(name):
    case, labels = make_case(seed=1)
    settings = {"alpha": 0.5, "temperature": 2.0, "chunk_size": 5, "divergence": get_divergence(name)}
    assert_same(fused_path(case, labels, True, teacher_as_logits=True, **settings),
                naive_path(case, labels, True, **settings))


def test_ce_only_equals_naive_and_step_normalisation():
    case, labels = make_case(seed=2)
    hidden, weight = leaves(case, True)
    parts = fused_distillation_loss(hidden, weight, labels, num_items=30, settings=LossSettings(chunk_size=5))
    parts.loss.backward()
    ref_hidden, ref_weight = leaves(case, True)
    reference = distillation_loss(F.linear(ref_hidden, ref_weight), labels, num_items=30)
    reference.loss.backward()
    assert_same((parts, hidden.grad, weight.grad), (reference, ref_hidden.grad, ref_weight.grad))
    assert float(parts.kd) == 0.0


def test_backward_scales_by_the_incoming_gradient():
    case, labels = make_case(seed=3)
    hidden, weight = leaves(case, True)
    (fused_distillation_loss(hidden, weight, labels, case["teacher_hidden"], case["teacher_weight"],
                             **loss_options({"chunk_size": 5})).loss * 3.0).backward()
    _, ref_hidden_grad, ref_weight_grad = fused_path(case, labels, True, chunk_size=5)
    torch.testing.assert_close(hidden.grad, 3.0 * ref_hidden_grad)
    torch.testing.assert_close(weight.grad, 3.0 * ref_weight_grad)


def test_values_without_gradients_under_no_grad():
    case, labels = make_case(seed=4)
    hidden, weight = leaves(case, True)
    with torch.no_grad():
        parts = fused_distillation_loss(hidden, weight, labels, case["teacher_hidden"], case["teacher_weight"],
                                        **loss_options({"chunk_size": 5}))
    reference, _, _ = naive_path(case, labels, True, chunk_size=5)
    assert parts.loss.grad_fn is None
    torch.testing.assert_close(parts.loss, reference.loss.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.requires_liger
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_liger_backend_equals_naive(name):
    generator = torch.Generator().manual_seed(5)
    case, labels = make_case(seed=5)
    case["student_weight"] = torch.randn(VOCAB, HIDDEN, generator=generator) * 0.5  # Liger: no student padding
    settings = {"alpha": 0.3, "temperature": 2.0, "chunk_size": 5, "num_items": 20,
                "divergence": get_divergence(name, jsd_beta=0.3)}
    hidden, weight = leaves(case, True)
    parts = liger_distillation_loss(hidden, weight, labels, case["teacher_hidden"], case["teacher_weight"],
                                    **loss_options(settings))
    parts.loss.backward()
    assert_same((parts, hidden.grad, weight.grad), naive_path(case, labels, True, **settings))


@pytest.mark.e2e
def test_fused_peak_memory_is_bounded_by_the_chunk():
    """V = 32000, 8192 answer tokens, chunks of 1024: the fused path's extra peak stays below three fp32
    chunk x V buffers and at least 85% below the naive path's, measured as peak RSS in separate processes."""
    probe = Path(__file__).with_name("memory_probe.py")
    env = checkout_env(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    peaks = {impl: int(subprocess.run([sys.executable, str(probe), impl], env=env, capture_output=True, text=True,
                                      check=True).stdout) for impl in ("fused", "naive")}
    chunk_bytes = 1024 * 32000 * 4
    assert peaks["fused"] < 3 * chunk_bytes, peaks
    assert peaks["fused"] <= 0.15 * peaks["naive"], peaks


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{key: value for key, value in json.loads(line).items() if key != "train_runtime" and "per_second" not in key}
            for line in lines]


def count_fused_calls(monkeypatch) -> list:
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("teacher_hidden") is not None)
        return fused_distillation_loss(*args, **kwargs)

    monkeypatch.setitem(backends_module.LOSS_FUNCTIONS, "fused", spy)
    return calls


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["neo", "kd"])
def test_training_runs_equal_with_fused_and_naive(models_dir, train_file, tmp_path, method, monkeypatch):
    runs, calls = {}, count_fused_calls(monkeypatch)
    for impl in ("fused", "naive"):
        out = tmp_path / impl
        distill(parse_config(run_flags(models_dir, train_file, out, method=method, loss_impl=impl)))
        runs[impl] = read_metrics(out)
        if impl == "fused":
            assert calls and all(calls), "the fused run must go through the fused head with the teacher's hidden states"
            calls.clear()
    assert not calls
    assert len(runs["fused"]) == len(runs["naive"]) > 3
    for fused_line, naive_line in zip(runs["fused"], runs["naive"], strict=True):
        assert fused_line.keys() == naive_line.keys()
        for key, value in naive_line.items():
            assert fused_line[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.e2e
@pytest.mark.requires_liger
def test_training_with_the_liger_backend_equals_naive(models_dir, train_file, tmp_path):
    runs = {}
    for impl in ("liger", "naive"):
        out = tmp_path / impl
        distill(parse_config(run_flags(models_dir, train_file, out, loss_impl=impl, divergence="jsd")))
        runs[impl] = read_metrics(out)
    for liger_line, naive_line in zip(runs["liger"], runs["naive"], strict=True):
        for key, value in naive_line.items():
            assert liger_line[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.e2e
def test_tied_embeddings_train_through_the_fused_head(tokenizer, train_file, tmp_path, monkeypatch):
    """sft on a student whose lm_head is its input embedding: both uses of the weight get their gradient."""
    student = save_model(tmp_path / "tied", build_tiny_llama(tokenizer, seed=6, tie_word_embeddings=True), tokenizer)
    results, calls = {}, count_fused_calls(monkeypatch)
    for impl in ("fused", "naive"):
        out = tmp_path / impl
        distill(parse_config(run_flags({"student": student}, train_file, out, method="sft", loss_impl=impl)))
        results[impl] = read_metrics(out)
    assert len(results["fused"]) == len(results["naive"]) > 3 and len(calls) == 3
    for fused_line, naive_line in zip(results["fused"], results["naive"], strict=True):
        for key, value in naive_line.items():
            assert fused_line[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_unsupported_heads_fall_back_to_naive(tokenizer, caplog):
    model = build_tiny_llama(tokenizer, seed=7)
    divergence = get_divergence("forward_kl")
    assert choose_loss_impl("fused", divergence, model) == "fused"
    model.config.final_logit_softcapping = 30.0
    with caplog.at_level(logging.WARNING):
        assert choose_loss_impl("fused", divergence, model) == "naive"
    assert "final_logit_softcapping=30.0" in caplog.text
    with pytest.raises(ConfigError, match="loss_impl liger cannot be used: the student: its config sets"):
        choose_loss_impl("liger", divergence, model, model, len(tokenizer))


def test_liger_refuses_what_it_cannot_compute(tokenizer, monkeypatch):
    model = build_tiny_llama(tokenizer, seed=8)
    with pytest.raises(ConfigError, match="covers forward_kl, reverse_kl and jsd only"):
        choose_loss_impl("liger", get_divergence("tvd"), model, model, len(tokenizer))
    with pytest.raises(ConfigError, match=r"student's output vocabulary \(\d+\) to equal the shared one \(10\)"):
        choose_loss_impl("liger", get_divergence("jsd"), model, model, 10)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="liger-kernel is not installed"):
        choose_loss_impl("liger", get_divergence("forward_kl"), model, model, len(tokenizer))
    assert choose_loss_impl("liger", get_divergence("forward_kl"), model) == "fused"  # CE only: our head
