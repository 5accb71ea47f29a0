"""Liger-Kernel's chunked distillation loss as an optional backend (``--loss_impl liger``), for comparison.

Liger's ``LigerFusedLinearJSDLoss`` covers the generalized JSD family: beta = 0 is forward KL, beta = 1 reverse KL
(each divergence record says which beta it is, if any). It normalises by the answer tokens of its own call and has
no T^2 factor, so both are applied here to match llm-neo's loss: sums over the optimizer step's answer tokens, KD
term scaled by T^2.
"""

from __future__ import annotations

import importlib.util

import torch

from .contract import (DEFAULT_LOSS_SETTINGS, IGNORE_INDEX, LossParts, LossSettings,
                       answer_mask, answer_rows, answer_targets)
from .divergences import Divergence


def liger_unavailable_reason(divergence: Divergence, student_vocab: int, kd_vocab: int) -> str | None:
    if divergence.liger_beta is None:
        return "Liger's distillation loss covers forward_kl, reverse_kl and jsd only"
    if student_vocab != kd_vocab:
        return f"Liger needs the student's output vocabulary ({student_vocab}) to equal the shared one ({kd_vocab})"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    return None


def liger_distillation_loss(student_hidden, student_weight, labels, teacher_hidden, teacher_weight, *,
                            settings: LossSettings = DEFAULT_LOSS_SETTINGS, num_items=None) -> LossParts:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    mask = answer_mask(labels)
    rows = mask.sum()
    num_items = rows if num_items is None else torch.as_tensor(num_items, device=rows.device)
    vocab, temperature = settings.kd_vocab_size or student_weight.shape[0], settings.temperature
    loss_fn = LigerFusedLinearJSDLoss(
        weight_hard_loss=settings.alpha, weight_soft_loss=(1.0 - settings.alpha) * temperature**2,
        beta=settings.divergence.liger_beta, ignore_index=IGNORE_INDEX, temperature=temperature,
        compiled=student_hidden.is_cuda, chunk_size=settings.chunk_size, return_soft_hard_loss=True,
    )
    loss, soft, hard = loss_fn(answer_rows(student_hidden, mask), student_weight, answer_rows(teacher_hidden, mask),
                               teacher_weight[:vocab], answer_targets(labels, mask))
    renormalise = rows / num_items  # Liger divided by this call's tokens; llm-neo divides by the step's
    return LossParts(loss=loss * renormalise, ce=(hard * renormalise).detach(),
                     kd=(soft * temperature**2 * renormalise).detach())
