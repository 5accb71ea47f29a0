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
    per_row, answer_tokens = {name: [] for name in ROW_SUMS}, 0
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        answer_tokens += answer_mask(batch["labels"]).sum().item()
        for name, sums in _row_sums(student, teacher, batch, vocab_map, chunk_size).items():
            per_row[name].extend(sums.tolist())
    student.train(was_training)
    return _aligned_metrics(per_row, answer_tokens, bootstrap)


ROW_SUMS = ("aligned", "kl", "agree", "mass")  # per held-out row: its boundaries, and these summed over them


@torch.no_grad()
def _row_sums(student, teacher, batch: dict, vocab_map: VocabularyMap, chunk_size: int) -> dict[str, torch.Tensor]:
    """Each batch row's aligned boundaries, and the KL, agreement and the teacher's mapped mass summed over them."""
    rows = batch["aligned_row"]
    sums = {name: torch.zeros(len(batch["input_ids"]), dtype=torch.float64, device=rows.device) for name in ROW_SUMS}
    sums["aligned"].index_add_(0, rows, torch.ones_like(rows, dtype=torch.float64))
    if rows.numel() == 0:
        return sums
    student_rows, student_weight = rows_at(student, batch["input_ids"], batch.get("attention_mask"), rows,
                                           batch["aligned_student"])
    teacher_rows, weight = rows_at(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"], rows,
                                   batch["aligned_teacher"])
    for start in range(0, rows.numel(), chunk_size):
        chunk = slice(start, start + chunk_size)
        reference = logit_rows(teacher_rows[chunk], weight)
        student_buckets, teacher_buckets = mapped_buckets(logit_rows(student_rows[chunk], student_weight), reference,
                                                          vocab_map)
        found = {"kl": forward_kl(student_buckets, teacher_buckets),
                 "agree": student_buckets.argmax(-1) == teacher_buckets.argmax(-1),
                 "mass": teacher_mapped_mass(reference, vocab_map)}
        for name, values in found.items():
            sums[name].index_add_(0, rows[chunk], values.double())
    return sums


def _aligned_metrics(per_row: dict[str, list], answer_tokens: int, bootstrap: int) -> dict[str, float]:
    totals = {name: sum(values) for name, values in per_row.items()}
    aligned = max(totals["aligned"], 1)
    metrics = {"aligned_coverage": totals["aligned"] / max(answer_tokens, 1), "aligned_kl": totals["kl"] / aligned,
               "aligned_top1_agreement": totals["agree"] / aligned, "teacher_mapped_mass": totals["mass"] / aligned}
    if bootstrap and per_row["aligned"]:
        draws = resampled_rows(len(per_row["aligned"]), bootstrap)
        for name, metric in (("kl", "aligned_kl"), ("agree", "aligned_top1_agreement")):
            metrics.update(percentile_interval(metric, resampled_ratios(per_row[name], per_row["aligned"], draws)))
    return metrics
