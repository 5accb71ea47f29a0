"""Offline metrics on held-out rows: student perplexity on answer tokens, top-1 agreement and KL to the teacher.

Like the fused loss, the logits are built only at answer positions, ``chunk_size`` rows at a time, from both models'
final hidden states (full logits only for heads the fused loss cannot reproduce).
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..lm_head import output_rows
from ..losses.contract import answer_mask, answer_row_index, answer_rows, answer_targets
from ..losses.divergences import forward_kl
from ..runtime.nonfinite import check_finite_rows
from ..teacher.online import answer_logit_chunks, teacher_logits
from .bootstrap import bits_per_byte_interval, bootstrap_intervals


@dataclass(frozen=True)
class HeldOutOptions:
    """How ``evaluate_against_teacher`` reads the held-out rows."""

    batch_size: int = 8  # rows per forward pass
    kd_vocab_size: int | None = None  # the shared vocabulary KL and agreement compare; None: the smaller head
    chunk_size: int = 1024  # answer rows whose fp32 logits are built at once
    progress: bool = False  # show a progress bar
    bootstrap: int = 0  # resamples of the held-out rows for 95% intervals (0: none)
    byte_lengths: torch.Tensor | None = None  # UTF-8 bytes of each id (data/vocabulary.py): adds bits per byte


@torch.no_grad()
def evaluate_against_teacher(student, dataset, collator, teacher=None,
                             options: HeldOutOptions = HeldOutOptions()) -> dict[str, float]:
    """Per answer token: perplexity of the student; with a teacher also top-1 agreement and KL(teacher || student).
    ``options.bootstrap`` > 0 adds 95% intervals from that many resamples of the held-out rows
    (evaluation/bootstrap.py). ``options.byte_lengths`` adds bits per byte: the answer tokens' NLL in bits over the
    bytes of the answer text, comparable between models with different tokenizers."""
    device = next(student.parameters()).device
    batch_size, byte_lengths, kd_vocab_size = options.batch_size, options.byte_lengths, options.kd_vocab_size
    if teacher is not None and kd_vocab_size is None:
        kd_vocab_size = min(output_rows(student), output_rows(teacher))
    was_training = student.training
    student.eval()
    sums = {name: torch.zeros(len(dataset), dtype=torch.float64) for name in ("nll", "agree", "kl", "tokens", "bytes")}
    loader = DataLoader(dataset.select_columns(["input_ids", "labels"]), batch_size=batch_size, collate_fn=collator)
    for number, batch in enumerate(tqdm(loader, desc="evaluating", unit="batch", disable=not options.progress)):
        _add_batch(sums, student, teacher, {k: v.to(device) for k, v in batch.items()}, number * batch_size,
                   dataclasses.replace(options, kd_vocab_size=kd_vocab_size))
    student.train(was_training)
    totals = {name: values.sum().item() for name, values in sums.items()}
    tokens = max(totals["tokens"], 1)
    metrics = {"perplexity": math.exp(totals["nll"] / tokens), "answer_tokens": int(totals["tokens"])}
    if byte_lengths is not None:
        metrics.update(bits_per_byte=totals["nll"] / math.log(2) / max(totals["bytes"], 1),
                       answer_bytes=int(totals["bytes"]))
        metrics.update(bits_per_byte_interval(sums["nll"].numpy(), sums["bytes"].numpy(), options.bootstrap))
    if teacher is not None:
        metrics.update(top1_agreement=totals["agree"] / tokens, kl_to_teacher=totals["kl"] / tokens)
    summed = ("nll", "agree", "kl") if teacher is not None else ("nll",)
    metrics.update(bootstrap_intervals({name: sums[name].numpy() for name in summed}, sums["tokens"].numpy(),
                                       resamples=options.bootstrap))
    return metrics


def _add_batch(sums: dict, student, teacher, batch: dict, first_row: int, options: HeldOutOptions) -> None:
    """Add one batch's per-token NLL (and agreement and KL with a teacher) to the per-row sums."""
    chunk_size, kd_vocab_size, byte_lengths = options.chunk_size, options.kd_vocab_size, options.byte_lengths
    mask = answer_mask(batch["labels"])
    targets = answer_targets(batch["labels"], mask).split(chunk_size)
    row_of = (answer_row_index(mask) + first_row).split(chunk_size)  # held-out row of each position
    teacher_chunks = answer_logit_chunks(teacher, batch, mask, chunk_size, kd_vocab_size) if teacher else None
    for rows, target, row in zip(answer_logit_chunks(student, batch, mask, chunk_size), targets, row_of, strict=True):
        check_finite_rows(rows, row, "the student's logits on the held-out rows")
        row = row.cpu()
        sums["nll"].index_add_(0, row, F.cross_entropy(rows, target, reduction="none").double().cpu())
        sums["tokens"].index_add_(0, row, torch.ones(len(row), dtype=torch.float64))
        if byte_lengths is not None:
            sums["bytes"].index_add_(0, row, byte_lengths[target.cpu()].double())
        if teacher_chunks is not None:
            reference = next(teacher_chunks)
            check_finite_rows(reference, row, "the teacher's logits on the held-out rows")
            vocab = reference.shape[-1]
            agree = rows[:, :vocab].argmax(-1) == reference.argmax(-1)
            sums["agree"].index_add_(0, row, agree.double().cpu())
            sums["kl"].index_add_(0, row, forward_kl(rows[:, :vocab], reference).double().cpu())


@torch.no_grad()
def teacher_fidelity_kl(reference, quantized, batch: dict, kd_vocab_size: int | None = None) -> float:
    """Mean KL(reference || quantized) per answer token of ``batch``: what quantizing the teacher changed."""
    mask = answer_mask(batch["labels"])
    rows = [answer_rows(teacher_logits(model, batch["input_ids"], batch.get("attention_mask")), mask)
            for model in (reference, quantized)]
    vocab = kd_vocab_size or rows[0].shape[-1]
    return forward_kl(rows[1][:, :vocab].float(), rows[0][:, :vocab].float()).mean().item()
