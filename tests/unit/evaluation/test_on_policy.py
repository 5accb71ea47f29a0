"""`eval --on_policy` (evaluation/on_policy.py): the repetition and distinct-2 measures against hand counts, the
answers' log-probabilities against a full forward pass, and the whole report for a student that is its own teacher
(reverse KL exactly 0, the teacher's answers equal the student's)."""

from __future__ import annotations

import math

import pytest
import torch

from llmneo.evaluation.evaluate import EvalRequest, evaluate_target
from llmneo.evaluation.on_policy import distinct_2, log_probs_of_answer, repeats_a_4gram
from llmneo.models.loading import load_pretrained_model


def test_repetition_and_distinct_2_count_by_hand():
    assert repeats_a_4gram([1, 2, 3, 4] * 3)  # 1 2 3 4 three times
    assert not repeats_a_4gram([1, 2, 3, 4] * 2 + [1, 2, 3])  # only twice
    assert not repeats_a_4gram([7, 7, 7])  # shorter than a 4-gram
    assert repeats_a_4gram([5] * 6)  # 5 5 5 5 at three offsets
    assert distinct_2([[1, 2, 1, 2], [2, 1]]) == pytest.approx(3 / 4)  # {(1,2) (2,1)} of 3 | {(2,1)} of 1
    assert distinct_2([[1], []]) == 0.0


def test_answer_log_probs_equal_a_full_forward(models_dir):
    model = load_pretrained_model(models_dir["student"], "model", None, "sdpa", False).eval()
    prompt, answer = [5, 9, 13, 2], [7, 11, 3]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].double()
    expected = [float(torch.log_softmax(logits[len(prompt) - 1 + i], -1)[token]) for i, token in enumerate(answer)]
    assert log_probs_of_answer(model, prompt, answer).tolist() == pytest.approx(expected, rel=1e-5)


def test_a_student_that_is_its_own_teacher(models_dir, train_file):
    request = EvalRequest(target=models_dir["student"], dataset=train_file, teacher_model=models_dir["student"],
                          max_samples=6, on_policy=True, on_policy_max_new_tokens=12, bootstrap=200)
    report = evaluate_target(request, write=False)["on_policy"]
    assert report["on_policy_reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert report["on_policy_prompts"] == 6
    for name in ("on_policy_reverse_kl", "teacher_nll_per_token", "repetition_rate", "distinct_2"):
        assert math.isfinite(report[name])
        assert report[f"{name}_ci_low"] - 1e-9 <= report[name] <= report[f"{name}_ci_high"] + 1e-9, name
    assert 0 <= report["repetition_rate"] <= 1 and 0 < report["distinct_2"] <= 1
    assert report["teacher_nll_per_token"] > 0
    assert len(report["on_policy_answers"]) == 3
    assert all(shown["student"] == shown["teacher"] for shown in report["on_policy_answers"])
