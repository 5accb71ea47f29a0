"""The KD term between a teacher and a student with different vocabularies (``--cross_tokenizer``).

It is computed at aligned boundaries only (data/alignment.py), on rows of both models' logits there, and added to
the student's CE on all of its answer tokens: ``alpha * CE + (1 - alpha) * T^2 * sum(D) / num_items``, with
``num_items`` the student's answer tokens of the optimizer step, as in the one-tokenizer loss. Three ways to
compare two distributions over different vocabularies (``VocabularyMap`` pairs the ids that stand for the same
bytes):

- ``exact``: both distributions (temperature applied) on the mapped pairs plus one tail bucket each for the mass
  on unmapped ids; any ``--divergence`` on that partition. With one tokenizer the map is the identity, nothing is
  unmapped, and this is the one-tokenizer KD term.
- ``uld``: Universal Logit Distillation (Boizard et al., 2024): the L1 distance between the two probability
  vectors, each sorted in decreasing order, the shorter padded with zeros. Needs no map; ignores ``--divergence``.
- ``hybrid``: ``exact`` (which matches the mapped tokens one to one and the unmapped mass as a whole) plus the
  ULD distance between the two unmapped remainders, each renormalised, weighted by the teacher's unmapped mass
  (held constant): the shape of the remainder counts as much as the teacher puts there.

Per chunk of rows the teacher's side is reduced once, without gradient, to what the divergence needs (bucket
log-weights; the sorted head of its probabilities at the student's width, since what lies past it meets the
student's zero padding), and the student's logits are rebuilt in the backward pass (activation checkpointing), so
neither model's full logits are kept between forward and backward.

The teacher's side comes from its logit rows (``teacher_targets``) or from its cached top-k in its own ids
(``cached_teacher_targets``, ``cache-teacher --cross_tokenizer``); both build one target type,
``CrossVocabTargets``, and one ``student_divergence`` computes each mode against it. From a cache, the mapped
top-k ids of each row are the buckets the two distributions share and everything else is one rest bucket per
side: the teacher's rest is its unmapped top-k entries (each tempered) plus the tail (tempered as if it were one
token, as the one-tokenizer cache does), the student's its exact mass outside the row's mapped ids; ``uld`` reads
the sorted top-k and, past them, the tail's mass; ``hybrid``'s remainder is the unmapped top-k entries. With k
covering the teacher's whole vocabulary (and a float32 cache) each mode equals its online form at any
temperature; with a smaller k it is the same approximation as the one-tokenizer cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .vocab_map import VocabularyMap
from .contract import LossParts, LossSettings
from .topk import TopKRows

CROSS_TOKENIZER_MODES = ("exact", "uld", "hybrid")
FLOOR = torch.finfo(torch.float32).min / 4  # the log-weight of an empty bucket: finite, so no 0 * inf appears


@dataclass
class CrossVocabTargets:
    """What the divergence needs of the teacher at a chunk of aligned rows, built without gradient and far smaller
    than its logits."""

    buckets: torch.Tensor | None = None  # exact, hybrid: log-weights over [shared buckets..., rest]
    head: torch.Tensor | None = None  # uld: the largest probabilities at the student's width, decreasing
    rest: torch.Tensor | None = None  # uld: the mass past ``head`` (N,)
    remainder_head: torch.Tensor | None = None  # hybrid: the same of the renormalised unmapped remainder
    remainder_rest: torch.Tensor | None = None
    remainder_weight: torch.Tensor | None = None  # hybrid: the teacher's unmapped mass (N,), held constant
    student_ids: torch.Tensor | None = None  # per row, the student ids of the buckets (a cache); None: the map's pairs
    mapped: torch.Tensor | None = None  # with student_ids: which of them are real pairs

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


def student_has_tail(vocab_map: VocabularyMap) -> bool:
    return len(vocab_map) < vocab_map.student_size


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
        tail = scaled.new_full((scaled.shape[0], 1), torch.finfo(torch.float32).min / 4)
    else:
        tail = _tail(scaled, vocab_map.teacher_ids)
    return torch.cat([mapped, tail], dim=1)


def _tail(scaled: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
    """log of the mass outside the mapped ids, (N, 1)."""
    return torch.logsumexp(scaled.index_fill(1, mapped, float("-inf")), dim=1, keepdim=True)


def scaled_rows(rows: torch.Tensor, size: int, temperature: float) -> torch.Tensor:
    return rows.float()[:, :size] / temperature


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


def _check_mode(mode: str) -> None:
    if mode not in CROSS_TOKENIZER_MODES:
        raise ValueError(f"unknown cross_tokenizer mode {mode!r}; expected one of {CROSS_TOKENIZER_MODES}")


@torch.no_grad()
def teacher_targets(teacher_rows: torch.Tensor, vocab_map: VocabularyMap, mode: str,
                    temperature: float = 1.0) -> CrossVocabTargets:
    """From the teacher's logit rows: bucket log-weights (exact, hybrid), the sorted head of its probabilities at
    the student's width and the mass past it (uld), and for hybrid the same of its renormalised unmapped remainder
    with the teacher's unmapped mass as weight."""
    _check_mode(mode)
    scaled = scaled_rows(teacher_rows, vocab_map.teacher_size, temperature)
    targets = CrossVocabTargets()
    if mode in ("exact", "hybrid"):
        targets.buckets = teacher_buckets(scaled, vocab_map)
    if mode == "uld":
        targets.head, targets.rest = sorted_head(F.softmax(scaled, dim=1), vocab_map.student_size)
    if mode == "hybrid" and len(vocab_map) < vocab_map.teacher_size:
        remainder = unmapped_columns(scaled, vocab_map.teacher_ids)
        targets.remainder_head, targets.remainder_rest = sorted_head(F.softmax(remainder, dim=1),
                                                                     _student_unmapped(vocab_map))
        targets.remainder_weight = 1.0 - F.softmax(scaled, dim=1).index_select(1, vocab_map.teacher_ids).sum(1)
    return targets


@torch.no_grad()
def cached_teacher_targets(topk: TopKRows, vocab_map: VocabularyMap, mode: str,
                           temperature: float = 1.0) -> CrossVocabTargets:
    """From the teacher's cached top-k rows (its own ids, log-probabilities at T = 1, log tail mass): per row the
    student ids of its mapped entries, and the same targets as ``teacher_targets``."""
    _check_mode(mode)
    student_ids = vocab_map.student_of_teacher[topk.token_ids.long()]
    mapped = student_ids >= 0
    scaled = topk.log_probs.float() / temperature
    tail = topk.log_tail.float()[:, None] / temperature
    probs = F.softmax(torch.cat([scaled, tail], dim=1), dim=1)  # the k entries and the tail, tempered
    targets = CrossVocabTargets(student_ids=student_ids.clamp_min(0), mapped=mapped)
    if mode in ("exact", "hybrid"):
        rest = torch.logsumexp(torch.cat([scaled.masked_fill(mapped, float("-inf")), tail], dim=1), dim=1)
        buckets = [scaled.masked_fill(~mapped, FLOOR)]
        # as online, no rest bucket when every student id is mapped and the rows cover the teacher's vocabulary
        if student_has_tail(vocab_map) or topk.token_ids.shape[1] < vocab_map.teacher_size:
            buckets.append(rest.clamp_min(FLOOR)[:, None])
        targets.buckets = torch.cat(buckets, dim=1)
    if mode == "uld":
        head, rest = sorted_head(probs[:, :-1], vocab_map.student_size)
        targets.head, targets.rest = head, rest + probs[:, -1]
    if mode == "hybrid" and len(vocab_map) < vocab_map.teacher_size:
        unmapped = probs[:, :-1].masked_fill(mapped, 0.0)
        weight = unmapped.sum(1)
        remainder = unmapped / weight.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        targets.remainder_head, targets.remainder_rest = sorted_head(remainder, _student_unmapped(vocab_map))
        targets.remainder_weight = weight
    return targets


def _student_unmapped(vocab_map: VocabularyMap) -> int:
    return max(vocab_map.student_size - len(vocab_map), 1)


def remainder_distance(scaled: torch.Tensor, targets: CrossVocabTargets, vocab_map: VocabularyMap) -> torch.Tensor:
    """hybrid's second term per row: ULD between the student's renormalised unmapped remainder and the teacher's
    (``remainder_head``/``remainder_rest``), weighted by the teacher's unmapped mass."""
    remainder = unmapped_columns(scaled, vocab_map.student_ids)
    student_rest = F.softmax(remainder, dim=1) if remainder.shape[1] else remainder.new_zeros((remainder.shape[0], 1))
    return targets.remainder_weight * sorted_l1(student_rest, targets.remainder_head, targets.remainder_rest)


def student_divergence(student_rows: torch.Tensor, targets: CrossVocabTargets, vocab_map: VocabularyMap,
                       mode: str, settings: LossSettings) -> torch.Tensor:
    """The divergence per aligned row (N,) against the teacher's targets, before the T^2 factor."""
    scaled = scaled_rows(student_rows, vocab_map.student_size, settings.temperature)
    if mode == "uld":
        return sorted_l1(F.softmax(scaled, dim=1), targets.head, targets.rest)
    value = settings.divergence(targets.student_buckets(scaled, vocab_map), targets.buckets, 1.0)
    if mode == "hybrid" and targets.remainder_head is not None:
        value = value + remainder_distance(scaled, targets, vocab_map)
    return value


def logit_rows(rows: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Logit rows from hidden-state rows and a head weight, or the rows themselves when they are logits (no weight)."""
    return rows if weight is None else F.linear(rows, weight)


def chunked_kd_sum(student_rows: torch.Tensor, chunk_targets, divergence, chunk_size: int,
                   student_weight=None) -> torch.Tensor:
    """Sum over rows of ``divergence(student_logits, targets)``, ``chunk_size`` rows at a time. ``chunk_targets``
    gives the teacher's targets of a slice of rows (built without gradient); the student's rows are logits, or
    hidden states when its head's weight is given, and its logits are rebuilt in the backward pass (activation
    checkpointing), so no chunk's logits are kept between forward and backward."""
    total = student_rows.new_zeros((), dtype=torch.float32)

    def chunk_sum(student_chunk, targets):
        return divergence(logit_rows(student_chunk, student_weight), targets).sum()

    for start in range(0, student_rows.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        with torch.no_grad():
            targets = chunk_targets(rows)
        if torch.is_grad_enabled() and student_rows.requires_grad:
            total = total + checkpoint(chunk_sum, student_rows[rows], targets, use_reentrant=False)
        else:
            total = total + chunk_sum(student_rows[rows], targets)
    return total


ChunkTargets = Callable[[slice, float], CrossVocabTargets]  # the teacher's targets of some aligned rows at T


def from_logit_rows(teacher_rows: torch.Tensor, vocab_map: VocabularyMap, mode: str,
                    teacher_weight: torch.Tensor | None = None) -> ChunkTargets:
    """The teacher's targets chunk by chunk from its rows: logits, or hidden states with its head's weight."""
    return lambda rows, temperature: teacher_targets(logit_rows(teacher_rows[rows], teacher_weight), vocab_map, mode,
                                                     temperature)


def from_topk(topk: TopKRows, vocab_map: VocabularyMap, mode: str) -> ChunkTargets:
    """The teacher's targets chunk by chunk from its cached top-k rows."""
    return lambda rows, temperature: cached_teacher_targets(topk[rows], vocab_map, mode, temperature)


def cross_vocab_kd_sum(student_rows: torch.Tensor, teacher: ChunkTargets, vocab_map: VocabularyMap, mode: str,
                       settings: LossSettings, student_weight=None) -> torch.Tensor:
    """Sum over aligned rows of the divergence. The student's rows are logits, or hidden states when its head's
    weight is given (then logits are built ``settings.chunk_size`` rows at a time); ``teacher`` builds the
    teacher's targets of each chunk once (``from_logit_rows``, ``from_topk``)."""
    return chunked_kd_sum(student_rows, lambda rows: teacher(rows, settings.temperature),
                          lambda logits, targets: student_divergence(logits, targets, vocab_map, mode, settings),
                          settings.chunk_size, student_weight)


def cross_tokenizer_parts(ce_parts: LossParts, kd_sum: torch.Tensor, num_items, settings: LossSettings) -> LossParts:
    """The loss from the student's CE-only parts and the summed cross-tokenizer divergence."""
    kd = kd_sum * settings.temperature**2 / num_items
    loss = settings.mix(ce_parts.loss, kd, has_teacher=True)
    return LossParts(loss=loss, ce=ce_parts.ce, kd=kd.detach())
