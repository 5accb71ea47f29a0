"""Bootstrap intervals over held-out rows: per-row sums against a row-by-row reference, the resampling against a
plain loop, the width against the normal approximation, and the eval command's output."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from llmneo import cli
from llmneo.data.collators import make_collator
from llmneo.evaluation.bootstrap import bootstrap_intervals
from llmneo.evaluation.metrics import HeldOutOptions, evaluate_against_teacher
from llmneo.models.loading import load_tokenizer
from transformers import AutoModelForCausalLM

from conftest import write_jsonl
from llmneo.demo.tiny import corpus_rows


def naive_row_sums(student, teacher, row: dict) -> dict[str, float]:
    """NLL, top-1 agreement and KL(teacher||student) summed over one row's answer tokens, from full logits."""
    ids = torch.tensor([row["input_ids"]])
    labels = torch.tensor(row["labels"])[1:]
    keep = labels != -100
    student_logits = student(ids).logits[0, :-1][keep]
    teacher_logits = teacher(ids).logits[0, :-1][keep]
    teacher_logp, student_logp = teacher_logits.log_softmax(-1), student_logits.log_softmax(-1)
    return {"nll": F.cross_entropy(student_logits, labels[keep], reduction="sum").item(),
            "agree": (student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum().item(),
            "kl": (teacher_logp.exp() * (teacher_logp - student_logp)).sum().item(),
            "tokens": int(keep.sum())}


def naive_interval(values: list[float], tokens: list[int], draws: np.ndarray, exp: bool) -> tuple[float, float]:
    means = []
    for draw in draws:
        total = sum(values[i] for i in draw)
        count = sum(tokens[i] for i in draw)
        means.append(total / count)
    means.sort()
    low, high = np.percentile(means, [2.5, 97.5])
    return (math.exp(low), math.exp(high)) if exp else (low, high)


@torch.no_grad()
def test_intervals_equal_a_row_by_row_reference(models_dir):
    tokenizer = load_tokenizer(models_dir["student"], role="model")
    student = AutoModelForCausalLM.from_pretrained(models_dir["student"]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(models_dir["teacher"]).eval()
    rows = []
    for conversation in corpus_rows()[:7]:
        turns = conversation["conversations"]
        prompt = tokenizer(turns[0]["value"])["input_ids"]
        answer = tokenizer(" " + turns[1]["value"])["input_ids"]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    dataset = Dataset.from_list(rows)
    lengths = torch.arange(student.config.vocab_size) % 5  # each id's bytes: an input, any values do
    metrics = evaluate_against_teacher(student, dataset, make_collator(tokenizer), teacher,
                                       HeldOutOptions(batch_size=3, bootstrap=200, byte_lengths=lengths))
    reference = [naive_row_sums(student, teacher, row) for row in rows]
    tokens = [row["tokens"] for row in reference]
    answer_bytes = [sum(int(lengths[i]) for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100)
                    for row in rows]
    assert metrics["answer_tokens"] == sum(tokens)
    assert metrics["perplexity"] == pytest.approx(math.exp(sum(r["nll"] for r in reference) / sum(tokens)), rel=1e-5)
    draws = np.random.default_rng(0).integers(0, len(rows), size=(200, len(rows)))
    for key, name, exp in (("nll", "perplexity", True), ("agree", "top1_agreement", False),
                           ("kl", "kl_to_teacher", False)):
        low, high = naive_interval([r[key] for r in reference], tokens, draws, exp)
        assert metrics[f"{name}_ci_low"] == pytest.approx(low, rel=1e-5, abs=1e-7)
        assert metrics[f"{name}_ci_high"] == pytest.approx(high, rel=1e-5, abs=1e-7)
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"]
    bits = [r["nll"] / math.log(2) for r in reference]
    assert metrics["bits_per_byte"] == pytest.approx(sum(bits) / sum(answer_bytes), rel=1e-6)
    low, high = naive_interval(bits, answer_bytes, draws, exp=False)  # the same resamples as the other metrics
    assert (metrics["bits_per_byte_ci_low"], metrics["bits_per_byte_ci_high"]) == pytest.approx((low, high), rel=1e-6)


def test_interval_width_matches_the_normal_approximation():
    values = np.random.default_rng(1).normal(2.0, 1.0, size=400)
    intervals = bootstrap_intervals({"kl": values}, np.ones(400), resamples=4000)
    expected = 2 * 1.96 * values.std() / math.sqrt(400)
    assert intervals["kl_to_teacher_ci_high"] - intervals["kl_to_teacher_ci_low"] == pytest.approx(expected, rel=0.1)


def test_rows_weighted_by_their_tokens_and_identical_rows_give_a_point():
    same = bootstrap_intervals({"agree": np.full(5, 3.0)}, np.full(5, 4.0), resamples=50)
    assert same["top1_agreement_ci_low"] == same["top1_agreement_ci_high"] == pytest.approx(0.75)
    # one long row dominates: every resample's mean lies between the rows' own means
    weighted = bootstrap_intervals({"kl": np.array([1.0, 90.0])}, np.array([1.0, 100.0]), resamples=500)
    assert 0.9 - 1e-9 <= weighted["kl_to_teacher_ci_low"] <= weighted["kl_to_teacher_ci_high"] <= 1.0
    assert bootstrap_intervals({"nll": np.ones(3)}, np.ones(3), resamples=0) == {}


@pytest.mark.e2e
def test_eval_command_prints_intervals_and_refuses_a_negative_count(models_dir, tmp_path, capsys):
    held_out = write_jsonl(tmp_path / "held_out.jsonl", corpus_rows()[:6])
    assert cli.main(["eval", models_dir["student"], "--dataset", held_out, "--teacher_model", models_dir["teacher"],
                     "--bootstrap", "300"]) == 0
    printed = capsys.readouterr().out
    scores = json.loads(printed[printed.index("{\n"):])["held_out"]
    for name in ("perplexity", "top1_agreement", "kl_to_teacher"):
        assert scores[f"{name}_ci_low"] <= scores[name] <= scores[f"{name}_ci_high"]
    with pytest.raises(SystemExit):
        cli.main(["eval", models_dir["student"], "--dataset", held_out, "--bootstrap", "-1"])
    assert "--bootstrap must be >= 0, got -1" in capsys.readouterr().err
