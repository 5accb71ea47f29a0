"""Offline metrics on held-out rows: student perplexity on answer tokens, top-1 agreement and KL to the teacher.

Like the fused loss, the logits are built only at answer positions, ``chunk_size`` rows at a time, from both models'
final hidden states (full logits only for heads the fused loss cannot reproduce).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..lm_head import output_head
from ..losses.contract import answer_mask, answer_row_index, answer_rows, answer_targets
from ..losses.divergences import forward_kl
from ..runtime.nonfinite import check_finite_rows
from ..teacher.online import answer_logit_chunks, teacher_logits


@torch.no_grad()
def evaluate_against_teacher(student, dataset, collator, teacher=None, batch_size: int = 8,
                             kd_vocab_size: int | None = None, chunk_size: int = 1024,
                             progress: bool = False) -> dict[str, float]:
    """Per answer token: perplexity of the student; with a teacher also top-1 agreement and KL(teacher || student)."""
    device = next(student.parameters()).device
    if teacher is not None and kd_vocab_size is None:
        kd_vocab_size = min(output_head(student).weight.shape[0], output_head(teacher).weight.shape[0])
    was_training = student.training
    student.eval()
    totals = {"nll": 0.0, "agree": 0.0, "kl": 0.0, "tokens": 0}
    loader = DataLoader(dataset.select_columns(["input_ids", "labels"]), batch_size=batch_size, collate_fn=collator)
    for number, batch in enumerate(tqdm(loader, desc="evaluating", unit="batch", disable=not progress)):
        batch = {k: v.to(device) for k, v in batch.items()}
        mask = answer_mask(batch["labels"])
        targets = answer_targets(batch["labels"], mask).split(chunk_size)
        row_of = (answer_row_index(mask) + number * batch_size).split(chunk_size)  # held-out row of each position
        teacher_chunks = answer_logit_chunks(teacher, batch, mask, chunk_size, kd_vocab_size) if teacher else None
        for rows, target, row in zip(answer_logit_chunks(student, batch, mask, chunk_size), targets, row_of,
                                     strict=True):
            check_finite_rows(rows, row, "the student's logits on the held-out rows")
            totals["nll"] += F.cross_entropy(rows, target, reduction="sum").item()
            totals["tokens"] += target.numel()
            if teacher_chunks is not None:
                reference = next(teacher_chunks)
                check_finite_rows(reference, row, "the teacher's logits on the held-out rows")
                vocab = reference.shape[-1]
                totals["agree"] += (rows[:, :vocab].argmax(-1) == reference.argmax(-1)).sum().item()
                totals["kl"] += forward_kl(rows[:, :vocab], reference).sum().item()
    student.train(was_training)
    tokens = max(totals["tokens"], 1)
    metrics = {"perplexity": math.exp(totals["nll"] / tokens), "answer_tokens": totals["tokens"]}
    if teacher is not None:
        metrics.update(top1_agreement=totals["agree"] / tokens, kl_to_teacher=totals["kl"] / tokens)
    return metrics


@torch.no_grad()
def teacher_fidelity_kl(reference, quantized, batch: dict, kd_vocab_size: int | None = None) -> float:
    """Mean KL(reference || quantized) per answer token of ``batch``: what quantizing the teacher changed."""
    mask = answer_mask(batch["labels"])
    rows = [answer_rows(teacher_logits(model, batch["input_ids"], batch.get("attention_mask")), mask)
            for model in (reference, quantized)]
    vocab = kd_vocab_size or rows[0].shape[-1]
    return forward_kl(rows[1][:, :vocab].float(), rows[0][:, :vocab].float()).mean().item()
