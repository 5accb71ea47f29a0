"""Teacher and student with different tokenizers, compared where they can be: at the aligned boundaries of answers.

- ``aligned_coverage``: aligned boundaries per student answer token;
- ``teacher_mapped_mass``: the teacher's mean probability on tokens the vocabulary map pairs (how much of its
  distribution the exact comparison sees one to one);
- ``aligned_kl``: KL(teacher || student) on the exact partition (mapped pairs plus one tail bucket each);
- ``aligned_top1_agreement``: both models' most likely bucket is the same (the same mapped token, or both the tail).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data.alignment import ALIGNMENT_COLUMNS
from ..losses.vocab_map import VocabularyMap
from ..losses.contract import answer_mask
from ..losses.cross_vocab import logit_rows
from ..losses.cross_vocab_modes import mapped_buckets
from ..losses.divergences import forward_kl
from ..teacher.online import rows_at
from .bootstrap import percentile_interval, resampled_ratios, resampled_rows


def teacher_mapped_mass(teacher_logit_rows: torch.Tensor, vocab_map: VocabularyMap) -> torch.Tensor:
    """Per row, the teacher's probability on the ids the map pairs."""
    probs = F.softmax(teacher_logit_rows.float()[:, :vocab_map.teacher_size], dim=-1)
    return probs.index_select(1, vocab_map.teacher_ids).sum(1)


def aligned_batches(dataset, collator, batch_size: int = 8) -> DataLoader:
    """Batches of held-out rows that carry their alignment (``collator``: an ``AlignedCollator``)."""
    return DataLoader(dataset.select_columns(["input_ids", "labels", *ALIGNMENT_COLUMNS]), batch_size=batch_size,
                      collate_fn=collator)


@torch.no_grad()
def evaluate_aligned(student, teacher, batches, vocab_map: VocabularyMap, chunk_size: int = 1024,
                     bootstrap: int = 0) -> dict[str, float]:
    """The aligned-boundary metrics above over ``batches`` (``aligned_batches``, in row order); with ``bootstrap``
    resamples of the held-out rows, 95% intervals of ``aligned_kl`` and ``aligned_top1_agreement``."""
    device = next(student.parameters()).device
    vocab_map = vocab_map.to(device)
    was_training = student.training
    student.eval()
    totals = dict.fromkeys(("aligned", "answer_tokens", "kl", "agree", "mass"), 0.0)
    per_row = {"kl": [], "agree": [], "aligned": []}  # each held-out row's sums, for the intervals
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        totals["answer_tokens"] += answer_mask(batch["labels"]).sum().item()
        rows = batch["aligned_row"]
        row_sums = {name: torch.zeros(len(batch["input_ids"]), dtype=torch.float64, device=device) for name in per_row}
        _add_rows(row_sums, rows, torch.ones(rows.numel(), dtype=torch.float64, device=device), "aligned")
        if rows.numel() == 0:
            _keep(per_row, row_sums)
            continue
        student_rows, student_weight = rows_at(student, batch["input_ids"], batch.get("attention_mask"), rows,
                                               batch["aligned_student"])
        teacher_rows, weight = rows_at(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"], rows,
                                       batch["aligned_teacher"])
        for start in range(0, rows.numel(), chunk_size):
            stop = start + chunk_size
            reference = logit_rows(teacher_rows[start:stop], weight)
            student_buckets, teacher_buckets = mapped_buckets(logit_rows(student_rows[start:stop], student_weight),
                                                              reference, vocab_map)
            kl = forward_kl(student_buckets, teacher_buckets)
            agree = (student_buckets.argmax(-1) == teacher_buckets.argmax(-1)).double()
            _add_rows(row_sums, rows[start:stop], kl, "kl")
            _add_rows(row_sums, rows[start:stop], agree, "agree")
            totals["kl"] += kl.sum().item()
            totals["agree"] += agree.sum().item()
            totals["mass"] += teacher_mapped_mass(reference, vocab_map).sum().item()
        totals["aligned"] += rows.numel()
        _keep(per_row, row_sums)
    student.train(was_training)
    aligned = max(totals["aligned"], 1)
    metrics = {"aligned_coverage": totals["aligned"] / max(totals["answer_tokens"], 1),
               "aligned_kl": totals["kl"] / aligned, "aligned_top1_agreement": totals["agree"] / aligned,
               "teacher_mapped_mass": totals["mass"] / aligned}
    if bootstrap and per_row["aligned"]:
        draws = resampled_rows(len(per_row["aligned"]), bootstrap)
        for name, metric in (("kl", "aligned_kl"), ("agree", "aligned_top1_agreement")):
            metrics.update(percentile_interval(metric, resampled_ratios(per_row[name], per_row["aligned"], draws)))
    return metrics


def _add_rows(row_sums: dict, rows: torch.Tensor, values: torch.Tensor, name: str) -> None:
    row_sums[name].index_add_(0, rows, values.double())


def _keep(per_row: dict, row_sums: dict) -> None:
    for name, sums in row_sums.items():
        per_row[name].extend(sums.tolist())
