"""The ways to compare two next-token distributions over different vocabularies (``--cross_tokenizer``), as types.

``VocabularyMap`` pairs the ids that stand for the same bytes. A mode (``CrossVocabMode``) reduces the teacher's
side of a chunk of aligned rows, once and without gradient, to the targets it needs — from the teacher's logit rows
(``from_logits``) or its cached top-k in its own ids (``from_topk``) — and each target type computes the divergence
of the student's rows against itself (``divergence``), temperature applied, before the T^2 factor:

- ``exact`` (``BucketTargets``): both distributions on the mapped pairs plus one tail bucket each for the mass on
  unmapped ids; any ``--divergence`` on that partition. With one tokenizer the map is the identity, nothing is
  unmapped, and this is the one-tokenizer KD term.
- ``uld`` (``SortedTargets``): Universal Logit Distillation (Boizard et al., 2024): the L1 distance between the two
  probability vectors, each sorted in decreasing order, the shorter padded with zeros. Needs no map; ignores
  ``--divergence``. The teacher is kept as the sorted head of its probabilities at the student's width, since what
  lies past it meets the student's zero padding.
- ``hybrid`` (``HybridTargets``): ``exact`` (which matches the mapped tokens one to one and the unmapped mass as a
  whole) plus the ULD distance between the two unmapped remainders, each renormalised, weighted by the teacher's
  unmapped mass (held constant): the shape of the remainder counts as much as the teacher puts there.

From a cache, the mapped top-k ids of each row are the buckets the two distributions share and everything else is
one rest bucket per side: the teacher's rest is its unmapped top-k entries (each tempered) plus the tail (tempered as
if it were one token, as the one-tokenizer cache does), the student's its exact mass outside the row's mapped ids;
``uld`` reads the sorted top-k and, past them, the tail's mass; ``hybrid``'s remainder is the unmapped top-k entries.
With k covering the teacher's whole vocabulary (and a float32 cache) each mode equals its online form at any
temperature; with a smaller k it is the same approximation as the one-tokenizer cache.

A new mode is one ``CrossVocabMode`` subclass with its target type, added to ``CROSS_VOCAB_MODES``; the config's
``cross_tokenizer`` choices name the same set (a test keeps them equal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .contract import LossSettings
from .topk import TopKRows
from .vocab_map import VocabularyMap

FLOOR = torch.finfo(torch.float32).min / 4  # the log-weight of an empty bucket: finite, so no 0 * inf appears


def student_has_tail(vocab_map: VocabularyMap) -> bool:
    return len(vocab_map) < vocab_map.student_size


def scaled_rows(rows: torch.Tensor, size: int, temperature: float) -> torch.Tensor:
    return rows.float()[:, :size] / temperature


def _tail(scaled: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
    """log of the mass outside the mapped ids, (N, 1)."""
    return torch.logsumexp(scaled.index_fill(1, mapped, float("-inf")), dim=1, keepdim=True)


def student_buckets(scaled: torch.Tensor, vocab_map: VocabularyMap) -> torch.Tensor:
    """The student's log-weights over [mapped pairs..., unmapped tail] (no tail when every id is mapped)."""
    mapped = scaled.index_select(1, vocab_map.student_ids)
    if not student_has_tail(vocab_map):
        return mapped
    return torch.cat([mapped, _tail(scaled, vocab_map.student_ids)], dim=1)


def teacher_buckets(scaled: torch.Tensor, vocab_map: VocabularyMap) -> torch.Tensor:
    """The teacher's log-weights over the student's buckets. When the student has no tail, the teacher's mass on
    unmapped ids cannot be expressed: it is left out (the mapped tokens are renormalised by the divergence). When
    only the student has unmapped ids, the teacher's tail has probability 0 (a finite log-weight, so that no
    divergence meets 0 * inf)."""
    mapped = scaled.index_select(1, vocab_map.teacher_ids)
    if not student_has_tail(vocab_map):
        return mapped
    if len(vocab_map) >= vocab_map.teacher_size:
        tail = scaled.new_full((scaled.shape[0], 1), FLOOR)
    else:
        tail = _tail(scaled, vocab_map.teacher_ids)
    return torch.cat([mapped, tail], dim=1)


def mapped_buckets(student_rows: torch.Tensor, teacher_rows: torch.Tensor, vocab_map: VocabularyMap,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-weights over [mapped pairs..., unmapped tail], temperature applied (feed them to a
    divergence at T = 1)."""
    return (student_buckets(scaled_rows(student_rows, vocab_map.student_size, temperature), vocab_map),
            teacher_buckets(scaled_rows(teacher_rows, vocab_map.teacher_size, temperature), vocab_map))


def sorted_head(probs: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``width`` largest probabilities per row in decreasing order, and the mass of the others (N,)."""
    if width >= probs.shape[1]:
        return probs.sort(dim=1, descending=True).values, probs.new_zeros(probs.shape[0])
    head = probs.topk(width, dim=1, sorted=True).values
    return head, (probs.sum(1) - head.sum(1)).clamp_min(0.0)


def sorted_l1(student_probs: torch.Tensor, teacher_head: torch.Tensor, teacher_rest: torch.Tensor) -> torch.Tensor:
    """Per row, sum |sort(p_s) - sort(p_t)| with both in decreasing order and the shorter padded with zeros; the
    teacher given by its ``sorted_head`` at the student's width (what lies past it meets the student's zeros)."""
    student = student_probs.sort(dim=1, descending=True).values
    width = max(student.shape[1], teacher_head.shape[1])
    student, teacher = F.pad(student, (0, width - student.shape[1])), F.pad(teacher_head, (0, width - teacher_head.shape[1]))
    return (student - teacher).abs().sum(1) + teacher_rest


def unmapped_columns(scaled: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(scaled.shape[1], dtype=torch.bool, device=scaled.device)
    keep[mapped] = False
    return scaled[:, keep]


def _student_unmapped(vocab_map: VocabularyMap) -> int:
    return max(vocab_map.student_size - len(vocab_map), 1)


@dataclass
class BucketTargets:
    """exact: the teacher's log-weights over [shared buckets..., rest]. From a cache the buckets differ per row:
    ``student_ids`` are the student ids of each row's buckets and ``mapped`` says which of them are real pairs."""

    buckets: torch.Tensor
    student_ids: torch.Tensor | None = None
    mapped: torch.Tensor | None = None

    def student_buckets(self, scaled: torch.Tensor, vocab_map: VocabularyMap) -> torch.Tensor:
        """The student's log-weights over the same buckets."""
        if self.student_ids is None:
            return student_buckets(scaled, vocab_map)
        buckets = scaled.gather(1, self.student_ids).masked_fill(~self.mapped, FLOOR)
        if self.buckets.shape[1] == self.student_ids.shape[1]:
            return buckets
        in_buckets = torch.zeros_like(scaled, dtype=torch.int32).scatter_add_(1, self.student_ids,
                                                                               self.mapped.int()) > 0
        # FLOOR, not -inf: a row whose buckets hold every id has an empty rest, and logsumexp's gradient is finite
        rest = torch.logsumexp(scaled.masked_fill(in_buckets, FLOOR), dim=1, keepdim=True)
        return torch.cat([buckets, rest], dim=1)

    def divergence(self, scaled: torch.Tensor, vocab_map: VocabularyMap, settings: LossSettings) -> torch.Tensor:
        return settings.divergence(self.student_buckets(scaled, vocab_map), self.buckets, 1.0)


@dataclass
class SortedTargets:
    """uld: the teacher's largest probabilities at the student's width, decreasing, and the mass past them (N,)."""

    head: torch.Tensor
    rest: torch.Tensor

    def divergence(self, scaled: torch.Tensor, vocab_map: VocabularyMap, settings: LossSettings) -> torch.Tensor:
        return sorted_l1(F.softmax(scaled, dim=1), self.head, self.rest)


@dataclass
class HybridTargets:
    """hybrid: exact's buckets, and the sorted head of the teacher's renormalised unmapped remainder with its
    unmapped mass (N,) as weight, held constant (no remainder when every teacher id is mapped)."""

    buckets: BucketTargets
    remainder: SortedTargets | None = None
    remainder_weight: torch.Tensor | None = None

    def divergence(self, scaled: torch.Tensor, vocab_map: VocabularyMap, settings: LossSettings) -> torch.Tensor:
        value = self.buckets.divergence(scaled, vocab_map, settings)
        if self.remainder is None:
            return value
        remainder = unmapped_columns(scaled, vocab_map.student_ids)
        if not remainder.shape[1]:  # every student id mapped: the student's remainder is empty
            remainder_probs = remainder.new_zeros((remainder.shape[0], 1))
        else:
            remainder_probs = F.softmax(remainder, dim=1)
        return value + self.remainder_weight * sorted_l1(remainder_probs, self.remainder.head, self.remainder.rest)


CrossVocabTargets = BucketTargets | SortedTargets | HybridTargets


@dataclass(frozen=True)
class CachedRows:
    """A chunk of the teacher's cached top-k rows in the student's terms, tempered: each entry's student id (clamped;
    ``mapped`` says which are real pairs), its log-weight, the tail's, and the probabilities of the k entries and
    the tail (last column)."""

    student_ids: torch.Tensor
    mapped: torch.Tensor
    scaled: torch.Tensor
    tail: torch.Tensor  # (N, 1)
    probs: torch.Tensor

    @classmethod
    def of(cls, topk: TopKRows, vocab_map: VocabularyMap, temperature: float) -> CachedRows:
        student_ids = vocab_map.student_of_teacher[topk.token_ids.long()]
        scaled = topk.log_probs.float() / temperature
        tail = topk.log_tail.float()[:, None] / temperature
        probs = F.softmax(torch.cat([scaled, tail], dim=1), dim=1)
        return cls(student_ids.clamp_min(0), student_ids >= 0, scaled, tail, probs)


class CrossVocabMode:
    """One way to compare the two distributions: builds the teacher's targets of a chunk of aligned rows."""

    name: str

    def from_logits(self, scaled: torch.Tensor, vocab_map: VocabularyMap) -> CrossVocabTargets:
        """From the teacher's logit rows, tempered and cut to its vocabulary."""
        raise NotImplementedError

    def from_topk(self, rows: CachedRows, vocab_map: VocabularyMap, k: int) -> CrossVocabTargets:
        """From its cached top-k rows (``k`` entries per row)."""
        raise NotImplementedError


class ExactMode(CrossVocabMode):
    name = "exact"

    def from_logits(self, scaled, vocab_map):
        return BucketTargets(teacher_buckets(scaled, vocab_map))

    def from_topk(self, rows, vocab_map, k):
        rest = torch.logsumexp(torch.cat([rows.scaled.masked_fill(rows.mapped, float("-inf")), rows.tail], dim=1),
                               dim=1)
        buckets = [rows.scaled.masked_fill(~rows.mapped, FLOOR)]
        # as online, no rest bucket when every student id is mapped and the rows cover the teacher's vocabulary
        if student_has_tail(vocab_map) or k < vocab_map.teacher_size:
            buckets.append(rest.clamp_min(FLOOR)[:, None])
        return BucketTargets(torch.cat(buckets, dim=1), rows.student_ids, rows.mapped)


class ULDMode(CrossVocabMode):
    name = "uld"

    def from_logits(self, scaled, vocab_map):
        return SortedTargets(*sorted_head(F.softmax(scaled, dim=1), vocab_map.student_size))

    def from_topk(self, rows, vocab_map, k):
        head, rest = sorted_head(rows.probs[:, :-1], vocab_map.student_size)
        return SortedTargets(head, rest + rows.probs[:, -1])


class HybridMode(CrossVocabMode):
    name = "hybrid"

    def from_logits(self, scaled, vocab_map):
        targets = HybridTargets(ExactMode().from_logits(scaled, vocab_map))
        if len(vocab_map) < vocab_map.teacher_size:
            remainder = unmapped_columns(scaled, vocab_map.teacher_ids)
            targets.remainder = SortedTargets(*sorted_head(F.softmax(remainder, dim=1), _student_unmapped(vocab_map)))
            targets.remainder_weight = 1.0 - F.softmax(scaled, dim=1).index_select(1, vocab_map.teacher_ids).sum(1)
        return targets

    def from_topk(self, rows, vocab_map, k):
        targets = HybridTargets(ExactMode().from_topk(rows, vocab_map, k))
        if len(vocab_map) < vocab_map.teacher_size:
            unmapped = rows.probs[:, :-1].masked_fill(rows.mapped, 0.0)
            weight = unmapped.sum(1)
            remainder = unmapped / weight.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
            targets.remainder = SortedTargets(*sorted_head(remainder, _student_unmapped(vocab_map)))
            targets.remainder_weight = weight
        return targets


CROSS_VOCAB_MODES: dict[str, CrossVocabMode] = {mode.name: mode for mode in (ExactMode(), ULDMode(), HybridMode())}


def cross_vocab_mode(name: str) -> CrossVocabMode:
    """The registered mode of that name (``--cross_tokenizer``)."""
    if name not in CROSS_VOCAB_MODES:
        raise ValueError(f"unknown cross_tokenizer mode {name!r}; expected one of {sorted(CROSS_VOCAB_MODES)}")
    return CROSS_VOCAB_MODES[name]


@torch.no_grad()
def teacher_targets(teacher_rows: torch.Tensor, vocab_map: VocabularyMap, mode: CrossVocabMode,
                    temperature: float = 1.0) -> CrossVocabTargets:
    """The teacher's targets from its logit rows."""
    return mode.from_logits(scaled_rows(teacher_rows, vocab_map.teacher_size, temperature), vocab_map)


@torch.no_grad()
def cached_teacher_targets(topk: TopKRows, vocab_map: VocabularyMap, mode: CrossVocabMode,
                           temperature: float = 1.0) -> CrossVocabTargets:
    """The teacher's targets from its cached top-k rows (its own ids, log-probabilities at T = 1, log tail mass)."""
    return mode.from_topk(CachedRows.of(topk, vocab_map, temperature), vocab_map, topk.token_ids.shape[1])


def student_divergence(student_rows: torch.Tensor, targets: CrossVocabTargets, vocab_map: VocabularyMap,
                       settings: LossSettings) -> torch.Tensor:
    """The divergence per aligned row (N,) of the student's logit rows against the teacher's targets, before the T^2
    factor."""
    return targets.divergence(scaled_rows(student_rows, vocab_map.student_size, settings.temperature), vocab_map,
                              settings)
