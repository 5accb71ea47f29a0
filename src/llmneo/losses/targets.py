"""What the loss of one batch compares the student with: the student's side (hidden states or logits) and one of
two teacher target types, each of which computes the batch's ``LossParts``.

- ``TokenTargets``: the teacher at every answer token of the student's own rows, as one of the ``TeacherRows``
  types (``HiddenStates`` with its head, ``Logits``, or ``TopK`` rows of a cache or server), or nothing (CE only):
  the one-tokenizer loss of backends.py.
- ``AlignedTargets``: the teacher at the aligned boundaries of the answers (across tokenizers): CE on all of the
  student's answer tokens plus the cross-vocabulary KD term (cross_vocab.py) at those rows.
- ``SampledTargets`` / ``AlignedSampledTargets``: on-policy ``sampled`` steps, the teacher's log-probability of
  each sampled token, or across tokenizers of each aligned byte span (sampled.py).

Teacher sources (teacher/signal.py) build these; the trainer only calls ``targets.loss(student, ...)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..errors import NeoError
from .backends import LOSS_FUNCTIONS
from .contract import LossParts, LossSettings, answer_mask
from .cross_vocab import ChunkTargets, cross_tokenizer_parts, cross_vocab_kd_sum
from .sampled import answer_log_probs, sampled_reverse_kl, span_reverse_kl
from .topk import TopKRows
from .vocab_map import VocabularyMap


@dataclass
class StudentSide:
    """The student's outputs for one loss call: final hidden states with the head's weight (fused, liger) or
    logits with no weight (naive)."""

    impl: str  # the loss implementation of this call (backends.py)
    rows: torch.Tensor  # (B, T, H) hidden states or (B, T, V) logits
    weight: torch.Tensor | None = None  # the output head's weight, with hidden states

    @property
    def reads_hidden_states(self) -> bool:
        return self.weight is not None

    def select(self, rows: torch.Tensor) -> StudentSide:
        """The student's side of batch rows ``rows`` (a teacher that scores some rows only)."""
        return StudentSide(self.impl, self.rows[rows.to(self.rows.device)], self.weight)

    def loss(self, labels: torch.Tensor, settings: LossSettings, num_items,
             teacher: TeacherRows | None = None) -> LossParts:
        """The one-tokenizer loss against ``teacher`` (none: CE only)."""
        outputs = (self.rows, self.weight) if self.reads_hidden_states else (self.rows,)
        found = teacher.loss_arguments() if teacher is not None else {}
        return LOSS_FUNCTIONS[self.impl](*outputs, labels, **found, settings=settings, num_items=num_items)


class TeacherRows(ABC):
    """The teacher at every position of the student's own rows, in one of the forms the loss functions read."""

    @abstractmethod
    def loss_arguments(self) -> dict:
        """The keyword arguments that hand these rows to a loss function (backends.LOSS_FUNCTIONS)."""

    @abstractmethod
    def answer_log_probs(self, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """The teacher's log-probability of each answer token (on-policy ``sampled`` steps)."""


@dataclass
class HiddenStates(TeacherRows):
    """Final hidden states (B, T, H) with the output head's weight: logits are built a chunk at a time."""

    hidden: torch.Tensor
    weight: torch.Tensor

    def loss_arguments(self) -> dict:
        return dict(teacher_hidden=self.hidden, teacher_weight=self.weight)

    def answer_log_probs(self, labels, chunk_size: int) -> torch.Tensor:
        return answer_log_probs(self.hidden, labels, self.weight, chunk_size)


@dataclass
class Logits(TeacherRows):
    """Logits (B, T, V), for heads the fused loss cannot reproduce."""

    logits: torch.Tensor

    def loss_arguments(self) -> dict:
        return dict(teacher_logits=self.logits)

    def answer_log_probs(self, labels, chunk_size: int) -> torch.Tensor:
        return answer_log_probs(self.logits, labels, None, chunk_size)


@dataclass
class TopK(TeacherRows):
    """Top-k rows in answer order (a cache, or a server), and where a server gave them the teacher's
    log-probability of each answer token itself (NaN where it gave none)."""

    rows: TopKRows
    token_log_probs: torch.Tensor | None = None

    def loss_arguments(self) -> dict:
        return dict(teacher_topk=self.rows)

    def answer_log_probs(self, labels, chunk_size: int) -> torch.Tensor:
        if self.token_log_probs is None or not torch.isfinite(self.token_log_probs).all():
            raise NeoError("the teacher's top-k rows hold no log-probability of some sampled tokens (a vLLM server "
                           "adds each prompt token's own; a cache holds none): on_policy_loss sampled needs them; "
                           "use full")
        return self.token_log_probs


class TeacherTargets(ABC):
    """The teacher's side of one batch's loss."""

    @abstractmethod
    def loss(self, student: StudentSide, labels: torch.Tensor, settings: LossSettings, num_items) -> LossParts:
        """CE and KD of the batch, divided by ``num_items`` (the answer tokens of the optimizer step)."""


@dataclass
class TokenTargets(TeacherTargets):
    """The teacher at every answer token (None: CE only)."""

    teacher: TeacherRows | None = None

    def loss(self, student: StudentSide, labels, settings: LossSettings, num_items) -> LossParts:
        return student.loss(labels, settings, num_items, self.teacher)


@dataclass
class AlignedTargets(TeacherTargets):
    """The teacher at aligned boundaries: the student's (row, position) of each and the teacher's targets there,
    chunk by chunk (cross_vocab.from_logit_rows or from_topk)."""

    rows: torch.Tensor  # (N,) batch row of each aligned boundary
    positions: torch.Tensor  # (N,) the student's position there, in the padded batch
    teacher: ChunkTargets
    vocab_map: VocabularyMap

    def loss(self, student: StudentSide, labels, settings: LossSettings, num_items) -> LossParts:
        ce_only = student.loss(labels, settings, num_items)
        kd_sum = cross_vocab_kd_sum(student.rows[self.rows, self.positions], self.teacher, self.vocab_map, settings,
                                    student.weight)
        items = num_items if num_items is not None else answer_mask(labels).sum()
        return cross_tokenizer_parts(ce_only, kd_sum, items, settings)


@dataclass
class SampledTargets(TeacherTargets):
    """On-policy ``sampled`` steps: the teacher's log-probability of each answer token the student sampled, from a
    ``TokenTargets`` that carries its hidden states and head or its logits (sampled.py)."""

    teacher: TokenTargets

    def loss(self, student: StudentSide, labels, settings: LossSettings, num_items) -> LossParts:
        if self.teacher.teacher is None:
            raise ValueError("sampled on-policy steps need a teacher")
        ours = answer_log_probs(student.rows, labels, student.weight, settings.chunk_size)
        with torch.no_grad():
            theirs = self.teacher.teacher.answer_log_probs(labels, settings.chunk_size)
        return sampled_reverse_kl(ours, theirs, num_items)


@dataclass
class AlignedSampledTargets(TeacherTargets):
    """On-policy ``sampled`` steps across tokenizers: per aligned byte span of the student's answers, (row, first,
    end) of its student prediction positions and the teacher's log-probability of the same bytes (sampled.py)."""

    spans: torch.Tensor  # (K, 3) long
    teacher_log_probs: torch.Tensor  # (K,)

    def loss(self, student: StudentSide, labels, settings: LossSettings, num_items) -> LossParts:
        ours = answer_log_probs(student.rows, labels, student.weight, settings.chunk_size)
        return span_reverse_kl(ours, answer_mask(labels), self.spans, self.teacher_log_probs, num_items)
