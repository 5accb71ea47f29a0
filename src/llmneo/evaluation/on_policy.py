"""What on-policy training is for, measured on held-out prompts (`llm-neo eval RUN --on_policy`): the student
answers each held-out row's last prompt, greedily and sampled at T = 1 (seeded), and the teacher scores the answers.

- ``on_policy_reverse_kl``: per token of the sampled answers, the mean of log p_s(y) − log p_t(y) (an estimate of
  KL(student ‖ teacher) on the student's own answers);
- ``teacher_nll_per_token``: the teacher's mean negative log-likelihood of the greedy answers' tokens;

(a teacher with another tokenizer scores its own rendering of the prompt and the answer's text: the log-probability
differences are summed over aligned byte spans, as on-policy training across tokenizers compares them, and divided
by the student tokens those spans cover);
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

from ..data.collators import rendered_answers
from ..losses.contract import IGNORE_INDEX
from ..losses.sampled import token_log_probs
from ..rollouts import Rollouts, RolloutSettings, last_prompt, row_seed
from ..teacher.online import span_log_probs
from .bootstrap import percentile_interval, resampled_rows, resampled_ratios


@dataclass(frozen=True)
class OnPolicyEvalOptions:
    max_new_tokens: int = 128  # answer budget, greedy and sampled
    seed: int = 0  # the sampled answers' seed
    bootstrap: int = 1000  # resamples of the prompts for the intervals (0: none)
    shown: int = 3  # answers quoted beside the teacher's
    batch_size: int = 8  # prompts answered and answers scored at a time


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
def answer_token_log_probs(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int,
                           batch_size: int = 8) -> list[np.ndarray]:
    """log p(answer token | prompt, earlier answer tokens) under ``model``, one array per answer, scored
    ``batch_size`` answers at a time (right-padded, so each row's positions are its own)."""
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(prompts), batch_size):
        batch, mask, _ = answer_batch(prompts[start:start + batch_size], answers[start:start + batch_size], pad_id,
                                      device)
        log_probs = per_position_log_probs(model, batch, mask)
        for b, (prompt, answer) in enumerate(zip(prompts[start:start + batch_size], answers[start:start + batch_size],
                                                 strict=True)):
            scores.append(log_probs[b, len(prompt) - 1:len(prompt) + len(answer) - 1].double().cpu().numpy())
    return scores


def answer_batch(prompts: list[list[int]], answers: list[list[int]], pad_id: int, device):
    """Prompt + answer rows, right-padded: input ids, attention mask, and labels on the answers only."""
    width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for b, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        ids[b, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[b, len(prompt):len(prompt) + len(answer)] = torch.tensor(answer, dtype=torch.long)
        mask[b, :len(prompt) + len(answer)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def per_position_log_probs(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p of each next token, position t predicting t + 1 (padding positions hold values that are not read)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    rows = logits.reshape(-1, logits.shape[-1])
    return token_log_probs(rows, ids[:, 1:].reshape(-1)).reshape(ids.shape[0], -1)


@dataclass
class AnswerScores:
    """One answer compared: the student's and the teacher's log-probabilities of the same units (its tokens with
    one tokenizer, its aligned byte spans across tokenizers) and the student tokens they cover."""

    student: np.ndarray
    teacher: np.ndarray
    tokens: int


class SameTokenizerScorer:
    """The teacher reads the student's own tokens: every answer token is a unit."""

    def __init__(self, student, teacher, pad_id: int, batch_size: int):
        self.student, self.teacher, self.pad_id, self.batch_size = student, teacher, pad_id, batch_size

    def scores(self, prompts: list[list[int]], answers: list[list[int]], rows: list[int]) -> list[AnswerScores]:
        ours = answer_token_log_probs(self.student, prompts, answers, self.pad_id, self.batch_size)
        theirs = answer_token_log_probs(self.teacher, prompts, answers, self.pad_id, self.batch_size)
        return [AnswerScores(s, t, len(s)) for s, t in zip(ours, theirs, strict=True)]

    def teacher_answers(self, rollouts: Rollouts, prompts: list[list[int]], seeds: list[int]) -> list[list[int]]:
        """The teacher's own greedy answers to the same prompts, shown beside the student's."""
        return _answers(rollouts, self.teacher, prompts, seeds, self.batch_size)


class AlignedScorer:
    """A teacher with another tokenizer reads its own rendering of each row's prompt messages and the answer's
    text (``aligner``: data.alignment.AnswerAligner over the held-out rows' prompt messages), as on-policy training
    across tokenizers does: the units are the aligned byte spans, each the sum of its tokens' log-probabilities on
    either side; student tokens after the last shared boundary are not compared."""

    def __init__(self, student, teacher, aligner, pad_id: int, teacher_pad_id: int, batch_size: int):
        self.student, self.teacher, self.aligner = student, teacher, aligner
        self.pad_id, self.teacher_pad_id, self.batch_size = pad_id, teacher_pad_id, batch_size

    @torch.no_grad()
    def scores(self, prompts: list[list[int]], answers: list[list[int]], rows: list[int]) -> list[AnswerScores]:
        device = next(self.student.parameters()).device
        found = []
        for start in range(0, len(prompts), self.batch_size):
            part = slice(start, start + self.batch_size)
            ids, mask, labels = answer_batch(prompts[part], answers[part], self.pad_id, device)
            inputs = {"input_ids": ids, "labels": labels, "row_id": torch.tensor(rows[part])}
            teacher, spans = rendered_answers(self.aligner, inputs, self.teacher_pad_id)
            theirs = span_log_probs(self.teacher, teacher, spans).double().cpu()
            running = per_position_log_probs(self.student, ids, mask).double().cpu().cumsum(1)
            running = torch.cat([running.new_zeros(len(ids), 1), running], dim=1)
            index, starts, ends = spans.row, spans.student_start, spans.student_end
            ours = running[index, ends] - running[index, starts]
            for b in range(len(ids)):
                mine = index == b
                found.append(AnswerScores(ours[mine].numpy(), theirs[mine].numpy(), int((ends - starts)[mine].sum())))
        return found

    def teacher_answers(self, rollouts: Rollouts, prompts: list[list[int]], seeds: list[int]) -> list[list[int]]:
        """None shown: the teacher answers in its own tokens, from its own rendering of the prompts."""
        return []


def evaluate_on_policy(student, teacher, tokenizer, held_out, options: OnPolicyEvalOptions, scorer=None) -> dict:
    """``scorer``: how the teacher scores the answers (default: it reads the student's tokens)."""
    prompts = [last_prompt(torch.tensor(row["input_ids"]), torch.tensor(row["labels"]), None) for row in held_out]
    seeds = [row_seed(options.seed, 0, row) for row in range(len(prompts))]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scorer = scorer or SameTokenizerScorer(student, teacher, pad_id, options.batch_size)
    greedy, sampled = (Rollouts(RolloutSettings(options.max_new_tokens, temperature, 1.0, options.seed), tokenizer)
                       for temperature in (0.0, 1.0))
    was_training = student.training
    student.eval()
    try:
        greedy_answers = _answers(greedy, student, prompts, seeds, options.batch_size)
        sampled_answers = _answers(sampled, student, prompts, seeds, options.batch_size)
        rows = list(range(len(prompts)))
        gaps = [(row.student - row.teacher, row.tokens) for row in scorer.scores(prompts, sampled_answers, rows)]
        nll = [(-row.teacher, row.tokens) for row in scorer.scores(prompts, greedy_answers, rows)]
        teacher_answers = scorer.teacher_answers(greedy, prompts[:options.shown], seeds[:options.shown])
    finally:
        student.train(was_training)
    repeated = np.array([float(repeats_a_4gram(answer)) for answer in greedy_answers])
    per_row = {"on_policy_reverse_kl": ([gap.sum() for gap, _ in gaps], [count for _, count in gaps]),
               "teacher_nll_per_token": ([row.sum() for row, _ in nll], [count for _, count in nll]),
               "repetition_rate": (repeated, np.ones_like(repeated)),
               "distinct_2": tuple(zip(*map(distinct_bigrams, greedy_answers), strict=True))}
    results = {name: float(np.sum(sums) / max(np.sum(counts), 1)) for name, (sums, counts) in per_row.items()}
    results.update(_intervals(per_row, len(prompts), options))
    results["on_policy_prompts"] = len(prompts)
    results["on_policy_answers"] = [
        {"prompt": tokenizer.decode(p, skip_special_tokens=True), "student": tokenizer.decode(a, skip_special_tokens=True),
         **({"teacher": tokenizer.decode(teacher_answers[i], skip_special_tokens=True)} if i < len(teacher_answers)
            else {})}
        for i, (p, a) in enumerate(zip(prompts[:options.shown], greedy_answers, strict=False))]  # the first few
    return results


def _answers(rollouts: Rollouts, model, prompts: list[list[int]], seeds: list[int], batch_size: int) -> list[list[int]]:
    """``model``'s answers to ``prompts``, ``batch_size`` at a time (left-padded, each row seeded by its own seed)."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        answers += rollouts.generate(model, prompts[start:start + batch_size], seeds[start:start + batch_size])[0]
    return answers


def _intervals(per_row: dict, prompts: int, options: OnPolicyEvalOptions) -> dict:
    """Percentile intervals over resampled prompts (each metric a ratio of per-prompt sums)."""
    if options.bootstrap < 1 or not prompts:
        return {}
    draws = resampled_rows(prompts, options.bootstrap, options.seed)
    intervals = {}
    for name, (sums, counts) in per_row.items():
        intervals.update(percentile_interval(name, resampled_ratios(sums, counts, draws)))
    return intervals
