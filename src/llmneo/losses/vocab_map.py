"""The map between two vocabularies: the ids that stand for the same bytes in both (built from the tokenizers in
data/vocabulary.py), and its file in a run or cache directory. Losses and data both read it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..runtime.layout import MAP_FILE


@dataclass
class VocabularyMap:
    """Ids that stand for the same bytes in both vocabularies, paired: ``teacher_ids[i]`` ~ ``student_ids[i]``.

    Ids below ``teacher_size`` / ``student_size`` that are not paired form each side's unmapped remainder; ids at
    or past them (output rows no tokenizer id reaches) take no part."""

    teacher_ids: torch.Tensor  # (M,) int64
    student_ids: torch.Tensor  # (M,) int64
    teacher_size: int
    student_size: int
    identical: bool = False  # one tokenizer: the identity over the shared output range, nothing unmapped

    def __len__(self) -> int:
        return int(self.teacher_ids.numel())

    @cached_property
    def student_of_teacher(self) -> torch.Tensor:
        """(teacher_size,) int64: the student id paired with each teacher id, -1 where it has none (built once per
        map: the cached KD term reads it at every chunk)."""
        lookup = torch.full((self.teacher_size,), -1, dtype=torch.long, device=self.teacher_ids.device)
        return lookup.index_copy_(0, self.teacher_ids, self.student_ids)

    def to(self, device) -> VocabularyMap:
        return VocabularyMap(self.teacher_ids.to(device), self.student_ids.to(device), self.teacher_size,
                             self.student_size, self.identical)

    def save(self, run_dir) -> Path:
        path = Path(run_dir) / MAP_FILE
        metadata = {"teacher_size": str(self.teacher_size), "student_size": str(self.student_size),
                    "identical": str(self.identical)}
        save_file({"teacher_ids": self.teacher_ids.contiguous(), "student_ids": self.student_ids.contiguous()},
                  str(path), metadata=metadata)
        return path


def load_vocabulary_map(run_dir) -> VocabularyMap | None:
    """The map a run saved, or None when it has none."""
    path = Path(run_dir) / MAP_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    return VocabularyMap(tensors["teacher_ids"], tensors["student_ids"], int(metadata["teacher_size"]),
                         int(metadata["student_size"]), metadata["identical"] == "True")
