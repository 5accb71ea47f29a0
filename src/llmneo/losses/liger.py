"""Liger-Kernel's chunked distillation loss as an optional backend (``--loss_impl liger``), for comparison.

Liger's ``LigerFusedLinearJSDLoss`` covers the generalized JSD family: beta = 0 is forward KL, beta = 1 reverse KL.
It normalises by the answer tokens of its own call and has no T^2 factor, so both are applied here to match
llm-neo's loss: sums over the optimizer step's answer tokens, KD term scaled by T^2.
"""

from __future__ import annotations

import importlib.util

import torch

from .chunked import IGNORE_INDEX, LossParts, answer_rows
from .divergences import forward_kl, generalized_jsd, reverse_kl


def liger_beta(divergence) -> float | None:
    """Liger's JSD beta for this divergence, or None when Liger has no equivalent."""
    function = getattr(divergence, "func", divergence)
    if function is forward_kl:
        return 0.0
    if function is reverse_kl:
        return 1.0
    if function is generalized_jsd:
        return getattr(divergence, "keywords", {}).get("beta", 0.5)
    return None


def liger_unavailable_reason(divergence, student_vocab: int, kd_vocab: int) -> str | None:
    if liger_beta(divergence) is None:
        return "Liger's distillation loss covers forward_kl, reverse_kl and jsd only"
    if student_vocab != kd_vocab:
        return f"Liger needs the student's output vocabulary ({student_vocab}) to equal the shared one ({kd_vocab})"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    return None


def liger_distillation_loss(
    student_hidden, student_weight, labels, teacher_hidden, teacher_weight, *, alpha=0.5, temperature=1.0,
    num_items=None, chunk_size=1024, kd_vocab_size=None, divergence=forward_kl,
) -> LossParts:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    mask = labels[:, 1:] != IGNORE_INDEX
    rows = mask.sum()
    num_items = rows if num_items is None else torch.as_tensor(num_items, device=rows.device)
    vocab = kd_vocab_size or student_weight.shape[0]
    loss_fn = LigerFusedLinearJSDLoss(
        weight_hard_loss=alpha, weight_soft_loss=(1.0 - alpha) * temperature**2, beta=liger_beta(divergence),
        ignore_index=IGNORE_INDEX, temperature=temperature, compiled=student_hidden.is_cuda, chunk_size=chunk_size,
        return_soft_hard_loss=True,
    )
    loss, soft, hard = loss_fn(answer_rows(student_hidden, mask), student_weight, answer_rows(teacher_hidden, mask),
                               teacher_weight[:vocab], labels[:, 1:][mask])
    renormalise = rows / num_items  # Liger divided by this call's tokens; llm-neo divides by the step's
    return LossParts(loss=loss * renormalise, ce=(hard * renormalise).detach(),
                     kd=(soft * temperature**2 * renormalise).detach())
