"""Batches of tokenized rows: padded to the longest row, labels padded with IGNORE_INDEX (packing: packing.py);
across tokenizers, also the teacher's rows and the aligned boundaries."""

from __future__ import annotations

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
