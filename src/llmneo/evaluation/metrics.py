"""Offline metrics on held-out rows: student perplexity on answer tokens, top-1 agreement and KL to the teacher."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader

from ..losses.chunked import IGNORE_INDEX, answer_rows
from ..losses.divergences import forward_kl
from ..teacher.online import teacher_logits


@torch.no_grad()
def evaluate_against_teacher(student, dataset, collator, teacher=None, batch_size: int = 8,
                             kd_vocab_size: int | None = None) -> dict[str, float]:
    """Per answer token: perplexity of the student; with a teacher also top-1 agreement and KL(teacher || student)."""
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    totals = {"nll": 0.0, "agree": 0.0, "kl": 0.0, "tokens": 0}
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
        batch = {k: v.to(device) for k, v in batch.items()}
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        rows = answer_rows(logits, mask).float()
        totals["nll"] += torch.nn.functional.cross_entropy(rows, batch["labels"][:, 1:][mask], reduction="sum").item()
        totals["tokens"] += int(mask.sum())
        if teacher is not None:
            vocab = kd_vocab_size or rows.shape[-1]
            target = answer_rows(teacher_logits(teacher, batch["input_ids"], batch["attention_mask"]), mask)[:, :vocab]
            totals["agree"] += (rows[:, :vocab].argmax(-1) == target.argmax(-1)).sum().item()
            totals["kl"] += forward_kl(rows[:, :vocab], target).sum().item()
    student.train(was_training)
    tokens = max(totals["tokens"], 1)
    metrics = {"perplexity": math.exp(totals["nll"] / tokens), "answer_tokens": totals["tokens"]}
    if teacher is not None:
        metrics.update(top1_agreement=totals["agree"] / tokens, kl_to_teacher=totals["kl"] / tokens)
    return metrics


@torch.no_grad()
def teacher_fidelity_kl(reference, quantized, batch: dict, kd_vocab_size: int | None = None) -> float:
    """Mean KL(reference || quantized) per answer token of ``batch``: what quantizing the teacher changed."""
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    rows = [answer_rows(teacher_logits(model, batch["input_ids"], batch.get("attention_mask")), mask)
            for model in (reference, quantized)]
    vocab = kd_vocab_size or rows[0].shape[-1]
    return forward_kl(rows[1][:, :vocab].float(), rows[0][:, :vocab].float()).mean().item()
