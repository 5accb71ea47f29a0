"""The LLM-Neo loss on class logits: alpha * CE(student, label) + (1 - alpha) * T^2 * D(teacher, student) per text.

One prediction per text, so there is nothing to shift or chunk. Both sums are divided by ``num_items`` (the
labelled texts of the whole optimizer step), so a step's gradients do not depend on how it is split into
micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .contract import DEFAULT_LOSS_SETTINGS, LossParts, LossSettings


def classification_distillation_loss(student_logits: torch.Tensor, labels: torch.Tensor,
                                     teacher_logits: torch.Tensor | None = None, *,
                                     settings: LossSettings = DEFAULT_LOSS_SETTINGS, num_items=None) -> LossParts:
    """``student_logits``/``teacher_logits``: (B, C); ``labels``: (B,) class ids. Without a teacher: CE only."""
    count = num_items if num_items is not None else labels.numel()
    ce = F.cross_entropy(student_logits.float(), labels, reduction="sum") / count
    if teacher_logits is None:
        return LossParts(ce, ce.detach(), torch.zeros_like(ce))
    kd = settings.temperature**2 * settings.divergence(student_logits, teacher_logits, settings.temperature).sum() / count
    return LossParts(settings.mix(ce, kd, True), ce.detach(), kd.detach())
