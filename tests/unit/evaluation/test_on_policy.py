"""`eval --on_policy` (evaluation/on_policy.py): the repetition and distinct-2 measures against hand counts, the
answers' log-probabilities (batched, padded) against a full forward pass, the whole report for a student that is its
own teacher (reverse KL exactly 0, the teacher's answers equal the student's), the reverse KL and teacher NLL with
another teacher against float64 references (one tokenizer, and across tokenizers on aligned byte spans), and
batched evaluation equal to one prompt at a time."""

from __future__ import annotations

import math

import pytest
import torch

from llmneo.evaluation.evaluate import EvalRequest, evaluate_target
import torch.nn.functional as F

from llmneo.config import DataArguments
from llmneo.data.alignment import PROMPT_COLUMN, AnswerAligner
from llmneo.data.loading import TeacherSide, build_dataset
from llmneo.evaluation.on_policy import (AlignedScorer, OnPolicyEvalOptions, answer_token_log_probs, distinct_2,
                                         evaluate_on_policy, repeats_a_4gram)
from llmneo.losses.contract import IGNORE_INDEX
from llmneo.models.loading import load_pretrained_model, load_reading_tokenizer, load_student_tokenizer
from llmneo.rollouts import Rollouts, RolloutSettings, last_prompt, row_seed, stop_token_ids


def test_repetition_and_distinct_2_count_by_hand():
    assert repeats_a_4gram([1, 2, 3, 4] * 3)  # 1 2 3 4 three times
    assert not repeats_a_4gram([1, 2, 3, 4] * 2 + [1, 2, 3])  # only twice
    assert not repeats_a_4gram([7, 7, 7])  # shorter than a 4-gram
    assert repeats_a_4gram([5] * 6)  # 5 5 5 5 at three offsets
    assert distinct_2([[1, 2, 1, 2], [2, 1]]) == pytest.approx(3 / 4)  # {(1,2) (2,1)} of 3 | {(2,1)} of 1
    assert distinct_2([[1], []]) == 0.0


def model(path: str):
    return load_pretrained_model(path, "model").eval()


@torch.no_grad()
def float64_log_probs(network, prompt: list[int], answer: list[int]) -> list[float]:
    """log p of each answer token from one unpadded forward pass, in float64."""
    logits = network(input_ids=torch.tensor([prompt + answer])).logits[0].double()
    return [float(torch.log_softmax(logits[len(prompt) - 1 + i], -1)[token]) for i, token in enumerate(answer)]


def test_answer_log_probs_equal_a_full_forward(models_dir):
    """Batched answers of different lengths (right padding) score as each alone."""
    student = model(models_dir["student"])
    prompts, answers = [[5, 9, 13, 2], [8, 3], [4, 4, 4, 4, 4, 6]], [[7, 11, 3], [9, 9, 9, 9, 2], [1]]
    scored = answer_token_log_probs(student, prompts, answers, pad_id=0, batch_size=3)
    for got, prompt, answer in zip(scored, prompts, answers, strict=True):
        assert got.tolist() == pytest.approx(float64_log_probs(student, prompt, answer), rel=1e-5)


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


def held_out_rows(tokenizer, train_file, count: int = 6, teacher_tokenizer=None):
    rows, _ = build_dataset(DataArguments(dataset=train_file, max_length=64), tokenizer, 0,
                            TeacherSide(teacher_tokenizer, keep_prompts=teacher_tokenizer is not None))
    return rows.select(range(count))


@torch.no_grad()
def test_reverse_kl_and_teacher_nll_against_a_float64_reference(models_dir, train_file):
    """Another teacher: on_policy_reverse_kl is the mean over the sampled answers' tokens of log p_student −
    log p_teacher (not teacher − student), teacher_nll_per_token the teacher's mean −log p of the greedy answers;
    the answers come from the student alone, one prompt at a time, and are scored in float64."""
    student, teacher = model(models_dir["student"]), model(models_dir["teacher"])
    tokenizer = load_student_tokenizer(type("Args", (), {"student_model": models_dir["student"],
                                                         "trust_remote_code": False})())
    rows = held_out_rows(tokenizer, train_file)
    options = OnPolicyEvalOptions(max_new_tokens=8, bootstrap=0, batch_size=4)
    report = evaluate_on_policy(student, teacher, tokenizer, rows, options)
    prompts = [last_prompt(torch.tensor(row["input_ids"]), torch.tensor(row["labels"]), None) for row in rows]
    gap, nll, tokens, greedy_tokens = 0.0, 0.0, 0, 0
    for index, prompt in enumerate(prompts):
        seed = row_seed(0, 0, index)
        sampled = Rollouts(RolloutSettings(8, 1.0, 1.0, 0), tokenizer).generate(student, [prompt], [seed])[0][0]
        greedy = Rollouts(RolloutSettings(8, 0.0, 1.0, 0), tokenizer).generate(student, [prompt], [seed])[0][0]
        gap += sum(float64_log_probs(student, prompt, sampled)) - sum(float64_log_probs(teacher, prompt, sampled))
        nll -= sum(float64_log_probs(teacher, prompt, greedy))
        tokens, greedy_tokens = tokens + len(sampled), greedy_tokens + len(greedy)
    assert report["on_policy_reverse_kl"] == pytest.approx(gap / tokens, rel=1e-5)
    assert report["teacher_nll_per_token"] == pytest.approx(nll / greedy_tokens, rel=1e-5)
    assert abs(report["on_policy_reverse_kl"]) > 1e-3  # another teacher: a figure whose sign the test can see


@pytest.mark.parametrize("across", [False, True])
def test_batched_evaluation_equals_one_prompt_at_a_time(models_dir, train_file, char_teacher, across):
    request = dict(target=models_dir["student"], dataset=train_file, max_samples=6, on_policy=True,
                   on_policy_max_new_tokens=8, bootstrap=0,
                   teacher_model=char_teacher if across else models_dir["teacher"])
    one = evaluate_target(EvalRequest(**request, batch_size=1), write=False)["on_policy"]
    batched = evaluate_target(EvalRequest(**request, batch_size=4), write=False)["on_policy"]
    for name in ("on_policy_reverse_kl", "teacher_nll_per_token", "repetition_rate", "distinct_2"):
        assert math.isfinite(batched[name]) and batched[name] == pytest.approx(one[name], rel=1e-5, abs=1e-7), name
    assert [shown["student"] for shown in batched["on_policy_answers"]] == [
        shown["student"] for shown in one["on_policy_answers"]]


@torch.no_grad()
def test_across_tokenizers_reverse_kl_on_aligned_spans_against_a_float64_reference(models_dir, train_file,
                                                                                   char_teacher):
    """A BPE student and a character-level teacher: each answer (the row's own, text that aligns past its first
    bytes) re-rendered for the teacher; per aligned byte span the student's log-probability of its tokens there
    minus the teacher's of its own, summed and divided by the student tokens the spans cover."""
    student, teacher = model(models_dir["student"]), model(char_teacher)
    tokenizer = load_student_tokenizer(type("Args", (), {"student_model": models_dir["student"],
                                                         "trust_remote_code": False})())
    teacher_tokenizer = load_reading_tokenizer(char_teacher, role="teacher")
    rows = held_out_rows(tokenizer, train_file, 4, teacher_tokenizer)
    stops = stop_token_ids(tokenizer)
    prompts, answers = [], []
    for row in rows:
        ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
        prompts.append(last_prompt(ids, labels, None))
        answer = [token for token in labels[len(prompts[-1]):].tolist() if token != IGNORE_INDEX]
        answers.append(answer[:next((i for i, token in enumerate(answer) if token in stops), len(answer) - 1) + 1])
    aligner = AnswerAligner(tokenizer, teacher_tokenizer, rows[PROMPT_COLUMN])
    scorer = AlignedScorer(student, teacher, aligner, tokenizer.pad_token_id, teacher_tokenizer.pad_token_id, 3)
    scores = scorer.scores(prompts, answers, list(range(len(rows))))
    got = sum(float((row.student - row.teacher).sum()) for row in scores) / sum(row.tokens for row in scores)
    total, covered = 0.0, 0
    for index, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        alignment = aligner.align(index, answer, len(prompt))
        ids, teacher_ids = prompt + answer, alignment.teacher_input_ids
        log_s = F.log_softmax(student(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        log_t = F.log_softmax(teacher(input_ids=torch.tensor([teacher_ids])).logits[0].double(), -1)
        pairs = list(zip(alignment.student_positions, alignment.teacher_positions, strict=True))
        ends = pairs[1:] + ([alignment.end] if alignment.end else [])
        for (s, t), (s_end, t_end) in zip(pairs, ends, strict=False):
            total += sum(float(log_s[p, ids[p + 1]]) for p in range(s, s_end))
            total -= sum(float(log_t[p, teacher_ids[p + 1]]) for p in range(t, t_end))
            covered += s_end - s
    assert covered > sum(map(len, answers)) / 2  # the answers' text aligns (not only their first bytes)
    assert got == pytest.approx(total / covered, rel=1e-5) and abs(got) > 1e-3
