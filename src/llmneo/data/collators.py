"""Batches of tokenized rows: padded to the longest row, labels padded with IGNORE_INDEX (packing: packing.py);
across tokenizers, also the teacher's rows and the aligned boundaries."""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

from ..losses.contract import IGNORE_INDEX
from .alignment import ALIGNMENT_COLUMNS, PROMPT_COLUMN


def make_collator(tokenizer, task: str = "causal_lm"):
    """Padded batches: token-level rows (labels padded so they train nothing), or texts to classify."""
    if task == "classification":
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)


class AlignedCollator:
    """For --cross_tokenizer: the student's padded batch plus the teacher's own rows (right-padded, with their
    attention mask) and the batch's aligned boundaries as three flat index tensors: ``aligned_row``,
    ``aligned_student`` and ``aligned_teacher`` (positions in the padded student and teacher rows)."""

    def __init__(self, student_collator, padding_side: str, teacher_pad_id: int):
        self.student_collator = student_collator
        self.padding_side = padding_side
        self.teacher_pad_id = teacher_pad_id

    def __call__(self, features: list[dict]) -> dict:
        batch = self.student_collator([{key: value for key, value in feature.items() if key not in _TEACHER_SIDE}
                                       for feature in features])
        if "teacher_input_ids" not in features[0]:  # a reader that wants the student's rows only
            return batch
        student_width = batch["input_ids"].shape[1]
        shifts = [student_width - len(feature["input_ids"]) if self.padding_side == "left" else 0
                  for feature in features]
        batch.update(teacher_side(features, self.teacher_pad_id, shifts))
        return batch


_TEACHER_SIDE = (*ALIGNMENT_COLUMNS, PROMPT_COLUMN)  # columns the student's collator never sees


class AlignedSpans(NamedTuple):
    """Aligned byte spans of a batch of answers, one entry per span: its row, and the prediction positions it
    covers on each side (starts inclusive, ends exclusive)."""

    row: torch.Tensor
    student_start: torch.Tensor
    student_end: torch.Tensor
    teacher_start: torch.Tensor
    teacher_end: torch.Tensor


def rendered_answers(aligner, inputs: dict, pad_id: int) -> tuple[dict, AlignedSpans]:
    """The teacher's rendering of each row of a batch of answers (``inputs``: right-padded input_ids with labels on
    each row's answer, and row_id), aligned by ``aligner`` (an AnswerAligner): the teacher's rows with the aligned
    boundaries (``teacher_side``), and the aligned byte spans between consecutive shared boundaries."""
    features, spans = [], []
    for index, row_id in enumerate(inputs["row_id"].tolist()):
        labels = inputs["labels"][index]
        labelled = (labels != IGNORE_INDEX).nonzero().flatten()
        alignment = aligner.align(row_id, labels[labelled].tolist(), int(labelled[0]))
        features.append({"teacher_input_ids": alignment.teacher_input_ids,
                         "aligned_student": alignment.student_positions,
                         "aligned_teacher": alignment.teacher_positions})
        pairs = list(zip(alignment.student_positions, alignment.teacher_positions, strict=True))
        pairs += [alignment.end] if alignment.end is not None else []
        spans += [(index, s, s_next, t, t_next) for (s, t), (s_next, t_next) in zip(pairs, pairs[1:], strict=False)]
    teacher = teacher_side(features, pad_id, [0] * len(features))  # right-padded
    device = inputs["input_ids"].device
    table = torch.tensor(spans, dtype=torch.long).reshape(-1, 5)
    return {key: value.to(device) for key, value in teacher.items()}, AlignedSpans(*table.unbind(1))


def teacher_side(features: list[dict], pad_id: int, shifts: list[int]) -> dict:
    """The teacher's rows of ``features`` (right-padded, with their attention mask) and their aligned boundaries as
    flat index tensors, the student positions moved by each row's ``shifts`` (its left padding)."""
    width = max(len(feature["teacher_input_ids"]) for feature in features)
    teacher_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    teacher_mask = torch.zeros((len(features), width), dtype=torch.long)
    rows, student, teacher = [], [], []
    for index, (feature, shift) in enumerate(zip(features, shifts, strict=True)):
        ids = list(feature["teacher_input_ids"])
        teacher_ids[index, :len(ids)], teacher_mask[index, :len(ids)] = torch.tensor(ids, dtype=torch.long), 1
        rows += [index] * len(feature["aligned_student"])
        student += [position + shift for position in feature["aligned_student"]]
        teacher += list(feature["aligned_teacher"])
    return {"teacher_input_ids": teacher_ids, "teacher_attention_mask": teacher_mask,
            "aligned_row": torch.tensor(rows, dtype=torch.long),
            "aligned_student": torch.tensor(student, dtype=torch.long),
            "aligned_teacher": torch.tensor(teacher, dtype=torch.long)}


ALIGNED_KEYS = ("aligned_row", "aligned_student", "aligned_teacher")  # flat per-boundary tensors, keyed by row


def batch_rows(batch: dict, rows: torch.Tensor) -> dict:
    """Rows ``rows`` (ascending indices) of a padded batch as a batch of their own, at the same width (positions
    stay valid): each per-row tensor indexed, the aligned boundaries of those rows kept and renumbered."""
    size = batch["input_ids"].shape[0]
    picked = {}
    if "aligned_row" in batch:
        keep = torch.isin(batch["aligned_row"], rows.to(batch["aligned_row"].device))
        renumber = torch.full((size,), -1, dtype=torch.long, device=keep.device)
        renumber[rows.to(keep.device)] = torch.arange(len(rows), device=keep.device)
        picked = {key: batch[key][keep] for key in ALIGNED_KEYS}
        picked["aligned_row"] = renumber[picked["aligned_row"]]
    for key, value in batch.items():
        if key in picked:
            continue
        per_row = torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == size
        picked[key] = value[rows.to(value.device)] if per_row else value
    return picked
