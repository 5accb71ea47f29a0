"""The LLM-Neo loss from full logits: alpha * CE + (1 - alpha) * T^2 * D over answer tokens, in chunks.

D is forward KL(teacher || student) by default, or any divergence of divergences.py.

The shift happens here and only here: logits at position t predict the label at t + 1, and the KD term uses the
same shifted answer mask as CE. Both sums are divided by ``num_items`` (answer tokens of the whole optimizer
step), so the gradients of a step do not depend on how it is split into micro-batches. Only gathered answer rows
are upcast to fp32, ``chunk_size`` rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .divergences import forward_kl
from .topk import TopKRows, kd_per_row

IGNORE_INDEX = -100


@dataclass
class LossParts:
    loss: torch.Tensor  # what is back-propagated
    ce: torch.Tensor  # detached, normalised CE contribution of this micro-batch
    kd: torch.Tensor  # detached, normalised T^2 * KL contribution of this micro-batch


def answer_rows(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of ``logits[:, :-1]`` at the positions selected by the shifted answer ``mask``."""
    return logits[:, :-1][mask]


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    num_items: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
    kd_vocab_size: int | None = None,
    divergence=forward_kl,
    teacher_topk: TopKRows | None = None,
    tail_mode: str = "bucket",
) -> LossParts:
    """``divergence(student_rows, teacher_rows, temperature)`` gives one value per row (see divergences.py).

    The teacher is its logits (B, T, V), or ``teacher_topk``: cached top-k rows already in answer order (topk.py).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    if num_items is None:
        num_items = mask.sum()
    student_rows, target_rows = answer_rows(student_logits, mask), targets[mask]
    teacher_rows = answer_rows(teacher_logits, mask) if teacher_logits is not None else teacher_topk
    vocab = kd_vocab_size or student_logits.shape[-1]
    ce_sum = student_logits.new_zeros((), dtype=torch.float32)
    kd_sum = torch.zeros_like(ce_sum)
    for start in range(0, student_rows.shape[0], chunk_size):
        rows = student_rows[start : start + chunk_size].float()
        ce_sum = ce_sum + F.cross_entropy(rows, target_rows[start : start + chunk_size], reduction="sum")
        if teacher_rows is not None:
            chunk_teacher = teacher_rows[start : start + chunk_size]
            if not isinstance(chunk_teacher, TopKRows):
                chunk_teacher = chunk_teacher[:, :vocab]
            kd_sum = kd_sum + kd_per_row(rows[:, :vocab], chunk_teacher, divergence, temperature, tail_mode).sum()
    ce = ce_sum / num_items
    kd = kd_sum * temperature**2 / num_items
    loss = alpha * ce + (1.0 - alpha) * kd if teacher_rows is not None else ce
    return LossParts(loss=loss, ce=ce.detach(), kd=kd.detach())
