"""The LLM-Neo loss from full logits (``--loss_impl naive``): the reference the fused and Liger heads are tested
against, and the fallback for heads they cannot reproduce.

``alpha * CE + (1 - alpha) * T^2 * D`` over answer tokens, D = forward KL(teacher || student) by default or any
divergence of divergences.py. Both sums are divided by ``num_items`` (answer tokens of the whole optimizer step),
so the gradients of a step do not depend on how it is split into micro-batches. Only gathered answer rows are
upcast to fp32, ``settings.chunk_size`` rows at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .contract import DEFAULT_LOSS_SETTINGS, LossParts, LossSettings, answer_mask, answer_rows, answer_targets
from .topk import LogitRows, TopKRows, kd_per_row


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    settings: LossSettings = DEFAULT_LOSS_SETTINGS,
    num_items: int | torch.Tensor | None = None,
    teacher_topk: TopKRows | None = None,
) -> LossParts:
    """The teacher is its logits (B, T, V), or ``teacher_topk``: cached top-k rows already in answer order (topk.py);
    without either the loss is CE only."""
    mask = answer_mask(labels)
    if num_items is None:
        num_items = mask.sum()
    student_rows, target_rows = answer_rows(student_logits, mask), answer_targets(labels, mask)
    vocab, chunk = settings.kd_vocab_size or student_logits.shape[-1], settings.chunk_size
    teacher_rows = (LogitRows(answer_rows(teacher_logits, mask)[:, :vocab]) if teacher_logits is not None
                    else teacher_topk)  # cached rows are already in answer order
    ce_sum = student_logits.new_zeros((), dtype=torch.float32)
    kd_sum = torch.zeros_like(ce_sum)
    for start in range(0, student_rows.shape[0], chunk):
        rows = student_rows[start : start + chunk].float()
        ce_sum = ce_sum + F.cross_entropy(rows, target_rows[start : start + chunk], reduction="sum")
        if teacher_rows is not None:
            kd_sum = kd_sum + kd_per_row(rows[:, :vocab], teacher_rows[start : start + chunk], settings.divergence,
                                         settings.temperature, settings.tail_mode).sum()
    ce = ce_sum / num_items
    kd = kd_sum * settings.temperature**2 / num_items
    return LossParts(loss=settings.mix(ce, kd, teacher_rows is not None), ce=ce.detach(), kd=kd.detach())
