"""The KD term against a teacher known only by its top-k log-probabilities (the offline teacher cache).

A cached answer row holds the teacher's k most likely token ids, their log-probabilities at T = 1, and the log of
the probability mass left outside them (the tail). Both distributions are compared on k (+1) buckets:

- ``bucket`` (default): the k tokens plus one tail bucket. The student's tail bucket is its exact mass outside the
  k tokens at temperature T. The teacher's buckets are softmax([log p_k, log tail] / T): exact at T = 1; at other
  temperatures the tail is tempered as if it were one token (its inner shape is not stored).
- ``renormalize``: the k tokens only, both distributions renormalised over them.

With k = V (every token cached) both modes equal the online KD term exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class LogitRows:
    """The teacher's logits at answer rows (N, V over the shared vocabulary): its whole distribution."""

    logits: torch.Tensor
    full_distribution: ClassVar[bool] = True  # the fused head's closed-form gradients apply

    def __len__(self) -> int:
        return self.logits.shape[0]

    def __getitem__(self, rows: slice) -> LogitRows:
        return LogitRows(self.logits[rows])

    def divergence_per_row(self, student_rows: torch.Tensor, divergence, temperature: float,
                           tail_mode: str = "bucket") -> torch.Tensor:
        return divergence(student_rows, self.logits, temperature)


@dataclass
class TopKRows:
    """Cached teacher rows, one per answer token: ids (N, k), log-probabilities (N, k) and log tail mass (N,)."""

    token_ids: torch.Tensor
    log_probs: torch.Tensor
    log_tail: torch.Tensor
    full_distribution: ClassVar[bool] = False  # k (+1) buckets, compared through bucket_logits

    def divergence_per_row(self, student_rows: torch.Tensor, divergence, temperature: float,
                           tail_mode: str = "bucket") -> torch.Tensor:
        student_buckets, teacher_buckets = bucket_logits(student_rows, self, temperature, tail_mode)
        return divergence(student_buckets, teacher_buckets, 1.0)

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def __getitem__(self, rows: slice) -> TopKRows:
        return TopKRows(self.token_ids[rows], self.log_probs[rows], self.log_tail[rows])

    def to(self, device) -> TopKRows:
        return TopKRows(*(tensor.to(device, non_blocking=True) for tensor in
                          (self.token_ids, self.log_probs, self.log_tail)))


def bucket_logits(student_rows: torch.Tensor, teacher: TopKRows, temperature: float, tail_mode: str = "bucket"):
    """Student and teacher log-weights over the shared buckets, temperature applied: feed them to a divergence at
    T = 1 (softmax over the buckets gives each side's bucket distribution)."""
    scaled = student_rows.float() / temperature
    ids = teacher.token_ids.long()
    student = scaled.gather(1, ids)
    teacher_logits = teacher.log_probs.float() / temperature
    if tail_mode == "renormalize" or ids.shape[1] >= scaled.shape[1]:  # k = V: there is no tail
        return student, teacher_logits
    student_tail = torch.logsumexp(scaled.scatter(1, ids, float("-inf")), dim=-1, keepdim=True)
    teacher_tail = teacher.log_tail.float()[:, None] / temperature
    return torch.cat([student, student_tail], dim=1), torch.cat([teacher_logits, teacher_tail], dim=1)


def kd_per_row(student_rows: torch.Tensor, teacher: LogitRows | TopKRows, divergence, temperature: float,
               tail_mode: str = "bucket") -> torch.Tensor:
    """The divergence per answer row, against teacher logit rows (over the shared vocabulary) or cached top-k."""
    return teacher.divergence_per_row(student_rows, divergence, temperature, tail_mode)
