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


def teacher_mapped_mass(teacher_logit_rows: torch.Tensor, vocab_map: VocabularyMap) -> torch.Tensor:
    """Per row, the teacher's probability on the ids the map pairs."""
    probs = F.softmax(teacher_logit_rows.float()[:, :vocab_map.teacher_size], dim=-1)
    return probs.index_select(1, vocab_map.teacher_ids).sum(1)


def aligned_batches(dataset, collator, batch_size: int = 8) -> DataLoader:
    """Batches of held-out rows that carry their alignment (``collator``: an ``AlignedCollator``)."""
    return DataLoader(dataset.select_columns(["input_ids", "labels", *ALIGNMENT_COLUMNS]), batch_size=batch_size,
                      collate_fn=collator)


@torch.no_grad()
def evaluate_aligned(student, teacher, batches, vocab_map: VocabularyMap, chunk_size: int = 1024) -> dict[str, float]:
    """The aligned-boundary metrics above over ``batches`` (``aligned_batches``)."""
    device = next(student.parameters()).device
    vocab_map = vocab_map.to(device)
    was_training = student.training
    student.eval()
    totals = dict.fromkeys(("aligned", "answer_tokens", "kl", "agree", "mass"), 0.0)
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        totals["answer_tokens"] += answer_mask(batch["labels"]).sum().item()
        rows = batch["aligned_row"]
        if rows.numel() == 0:
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
            totals["kl"] += forward_kl(student_buckets, teacher_buckets).sum().item()
            totals["agree"] += (student_buckets.argmax(-1) == teacher_buckets.argmax(-1)).sum().item()
            totals["mass"] += teacher_mapped_mass(reference, vocab_map).sum().item()
        totals["aligned"] += rows.numel()
    student.train(was_training)
    aligned = max(totals["aligned"], 1)
    return {"aligned_coverage": totals["aligned"] / max(totals["answer_tokens"], 1), "aligned_kl": totals["kl"] / aligned,
            "aligned_top1_agreement": totals["agree"] / aligned, "teacher_mapped_mass": totals["mass"] / aligned}
