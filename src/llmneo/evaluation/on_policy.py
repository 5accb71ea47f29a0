"""What on-policy training is for, measured on held-out prompts (`llm-neo eval RUN --on_policy`): the student
answers each held-out row's last prompt, greedily and sampled at T = 1 (seeded), and the teacher scores the answers.

- ``on_policy_reverse_kl``: per token of the sampled answers, the mean of log p_s(y) − log p_t(y) (an estimate of
  KL(student ‖ teacher) on the student's own answers);
- ``teacher_nll_per_token``: the teacher's mean negative log-likelihood of the greedy answers' tokens;
- ``repetition_rate``: the share of greedy answers in which some token 4-gram occurs 3 or more times;
- ``distinct_2``: distinct token bigrams within each greedy answer over its bigrams, summed over the answers (a
  looping answer repeats its bigrams);

each with a bootstrap 95% interval over the prompts, and the first few answers beside the teacher's own.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ..losses.sampled import token_log_probs
from ..rollouts import Rollouts, RolloutSettings, last_prompt, row_seed
from .bootstrap import percentile_interval, resampled_rows, resampled_ratios


@dataclass(frozen=True)
class OnPolicyEvalOptions:
    max_new_tokens: int = 128  # answer budget, greedy and sampled
    seed: int = 0  # the sampled answers' seed
    bootstrap: int = 1000  # resamples of the prompts for the intervals (0: none)
    shown: int = 3  # answers quoted beside the teacher's


def repeats_a_4gram(tokens: list[int]) -> bool:
    counts = Counter(tuple(tokens[i:i + 4]) for i in range(len(tokens) - 3))
    return any(count >= 3 for count in counts.values())


def distinct_bigrams(answer: list[int]) -> tuple[int, int]:
    """Distinct token bigrams of one answer, and its bigrams."""
    bigrams = [tuple(answer[i:i + 2]) for i in range(len(answer) - 1)]
    return len(set(bigrams)), len(bigrams)


def distinct_2(answers: list[list[int]]) -> float:
    counts = [distinct_bigrams(answer) for answer in answers]
    total = sum(bigrams for _, bigrams in counts)
    return sum(distinct for distinct, _ in counts) / total if total else 0.0


@torch.no_grad()
def log_probs_of_answer(model, prompt: list[int], answer: list[int]) -> np.ndarray:
    """log p(answer token | prompt, earlier answer tokens) under ``model``, one per answer token."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + answer], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
    return token_log_probs(logits, ids[0, len(prompt):]).double().cpu().numpy()


def evaluate_on_policy(student, teacher, tokenizer, held_out, options: OnPolicyEvalOptions) -> dict:
    prompts = [last_prompt(torch.tensor(row["input_ids"]), torch.tensor(row["labels"]), None) for row in held_out]
    seeds = [row_seed(options.seed, 0, row) for row in range(len(prompts))]
    greedy, sampled = (Rollouts(RolloutSettings(options.max_new_tokens, temperature, 1.0, options.seed), tokenizer)
                       for temperature in (0.0, 1.0))
    was_training = student.training
    student.eval()
    try:
        greedy_answers = [greedy.generate(student, [p], [s])[0][0] for p, s in zip(prompts, seeds, strict=True)]
        sampled_answers = [sampled.generate(student, [p], [s])[0][0] for p, s in zip(prompts, seeds, strict=True)]
        gaps = [log_probs_of_answer(student, p, a) - log_probs_of_answer(teacher, p, a)
                for p, a in zip(prompts, sampled_answers, strict=True)]
        teacher_answers = [greedy.generate(teacher, [p], [s])[0][0]
                           for p, s in zip(prompts[:options.shown], seeds[:options.shown], strict=True)]
    finally:
        student.train(was_training)
    nll = [-log_probs_of_answer(teacher, p, a) for p, a in zip(prompts, greedy_answers, strict=True)]
    repeated = np.array([float(repeats_a_4gram(answer)) for answer in greedy_answers])
    per_row = {"on_policy_reverse_kl": ([gap.sum() for gap in gaps], [gap.size for gap in gaps]),
               "teacher_nll_per_token": ([row.sum() for row in nll], [row.size for row in nll]),
               "repetition_rate": (repeated, np.ones_like(repeated)),
               "distinct_2": tuple(zip(*map(distinct_bigrams, greedy_answers), strict=True))}
    results = {name: float(np.sum(sums) / max(np.sum(counts), 1)) for name, (sums, counts) in per_row.items()}
    results.update(_intervals(per_row, len(prompts), options))
    results["on_policy_prompts"] = len(prompts)
    results["on_policy_answers"] = [
        {"prompt": tokenizer.decode(p, skip_special_tokens=True), "student": tokenizer.decode(a, skip_special_tokens=True),
         "teacher": tokenizer.decode(t, skip_special_tokens=True)}
        for p, a, t in zip(prompts, greedy_answers, teacher_answers, strict=False)]  # the first few
    return results


def _intervals(per_row: dict, prompts: int, options: OnPolicyEvalOptions) -> dict:
    """Percentile intervals over resampled prompts (each metric a ratio of per-prompt sums)."""
    if options.bootstrap < 1 or not prompts:
        return {}
    draws = resampled_rows(prompts, options.bootstrap, options.seed)
    intervals = {}
    for name, (sums, counts) in per_row.items():
        intervals.update(percentile_interval(name, resampled_ratios(sums, counts, draws)))
    return intervals
