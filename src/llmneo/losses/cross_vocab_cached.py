"""The KD term across vocabularies against a teacher known only by its cached top-k (``cache-teacher
--cross_tokenizer``): the teacher's k most likely ids at each aligned boundary, in the teacher's own ids, with their
log-probabilities at T = 1 and the log of the mass outside them (the tail).

The cached ids are mapped to the student's through the ``VocabularyMap``; per row the mapped ones are the buckets
the two distributions share, and everything else is one rest bucket on each side:

- ``exact``: [mapped top-k ids..., rest] with any ``--divergence``. The teacher's rest is its unmapped top-k
  entries (each tempered) plus the tail (tempered as if it were one token, as the one-tokenizer cache does); the
  student's rest is its exact mass outside the row's mapped ids.
- ``uld``: the sorted L1 distance of losses/cross_vocab.py, the teacher's side being its sorted top-k and, past
  them, the tail's mass.
- ``hybrid``: ``exact`` plus the ULD distance between the unmapped remainders, weighted by the teacher's unmapped
  mass; the teacher's remainder is its unmapped top-k entries (the tail's mass stays in the rest bucket).

With k covering the teacher's whole vocabulary (and a float32 cache) each mode equals its online form at any
temperature; with a smaller k it is the same approximation as the one-tokenizer cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.vocabulary import VocabularyMap
from .contract import LossSettings
from .cross_vocab import (CROSS_TOKENIZER_MODES, chunked_kd_sum, remainder_distance, scaled_rows, sorted_head,
                          sorted_l1, student_has_tail)
from .topk import TopKRows

FLOOR = torch.finfo(torch.float32).min / 4  # the log-weight of an empty bucket: finite, so no 0 * inf appears


@torch.no_grad()
def cached_teacher_targets(topk: TopKRows, vocab_map: VocabularyMap, mode: str,
                           temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """What the divergence needs of the cached teacher rows: per row the student ids of its mapped top-k entries,
    and the bucket log-weights (exact, hybrid), sorted head and rest mass (uld), unmapped remainder (hybrid)."""
    if mode not in CROSS_TOKENIZER_MODES:
        raise ValueError(f"unknown cross_tokenizer mode {mode!r}; expected one of {CROSS_TOKENIZER_MODES}")
    student_ids = vocab_map.student_of_teacher[topk.token_ids.long()]
    mapped = student_ids >= 0
    scaled = topk.log_probs.float() / temperature
    tail = topk.log_tail.float()[:, None] / temperature
    probs = F.softmax(torch.cat([scaled, tail], dim=1), dim=1)  # the k entries and the tail, tempered
    targets = {"student_ids": student_ids.clamp_min(0), "mapped": mapped}
    if mode in ("exact", "hybrid"):
        rest = torch.logsumexp(torch.cat([scaled.masked_fill(mapped, float("-inf")), tail], dim=1), dim=1)
        buckets = [scaled.masked_fill(~mapped, FLOOR)]
        if _has_rest(vocab_map, topk):
            buckets.append(rest.clamp_min(FLOOR)[:, None])
        targets["buckets"] = torch.cat(buckets, dim=1)
    if mode == "uld":
        head, rest = sorted_head(probs[:, :-1], vocab_map.student_size)
        targets["head"], targets["rest"] = head, rest + probs[:, -1]
    if mode == "hybrid" and len(vocab_map) < vocab_map.teacher_size:
        unmapped = probs[:, :-1].masked_fill(mapped, 0.0)
        weight = unmapped.sum(1)
        remainder = unmapped / weight.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        student_unmapped = vocab_map.student_size - len(vocab_map)
        targets["remainder_head"], targets["remainder_rest"] = sorted_head(remainder, max(student_unmapped, 1))
        targets["remainder_weight"] = weight
    return targets


def _has_rest(vocab_map: VocabularyMap, topk: TopKRows) -> bool:
    """Whether the buckets end with a rest bucket: as online, none when every student id is mapped and the cached
    rows cover the teacher's whole vocabulary (the student's rest would be empty)."""
    return student_has_tail(vocab_map) or topk.token_ids.shape[1] < vocab_map.teacher_size


def cached_student_divergence(student_rows: torch.Tensor, targets: dict[str, torch.Tensor],
                              vocab_map: VocabularyMap, mode: str, settings: LossSettings) -> torch.Tensor:
    """The divergence per aligned row (N,) against ``cached_teacher_targets``, before the T^2 factor."""
    scaled = scaled_rows(student_rows, vocab_map.student_size, settings.temperature)
    if mode == "uld":
        return sorted_l1(F.softmax(scaled, dim=1), targets["head"], targets["rest"])
    ids, mapped = targets["student_ids"], targets["mapped"]
    buckets = scaled.gather(1, ids).masked_fill(~mapped, FLOOR)
    if targets["buckets"].shape[1] > ids.shape[1]:
        in_buckets = torch.zeros_like(scaled, dtype=torch.int32).scatter_add_(1, ids, mapped.int()) > 0
        # FLOOR, not -inf: a row whose buckets hold every id has an empty rest, and logsumexp's gradient is finite
        rest = torch.logsumexp(scaled.masked_fill(in_buckets, FLOOR), dim=1, keepdim=True)
        buckets = torch.cat([buckets, rest], dim=1)
    value = settings.divergence(buckets, targets["buckets"], 1.0)
    if mode == "hybrid" and "remainder_head" in targets:
        value = value + remainder_distance(scaled, targets, vocab_map)
    return value


def cached_cross_vocab_kd_sum(student_rows: torch.Tensor, topk: TopKRows, vocab_map: VocabularyMap, mode: str,
                              settings: LossSettings, student_weight=None) -> torch.Tensor:
    """Sum over aligned rows of the divergence against the cached top-k; rows are the student's logits, or hidden
    states when its head's weight is given (see ``cross_vocab.chunked_kd_sum``)."""
    return chunked_kd_sum(
        student_rows, lambda rows: cached_teacher_targets(topk[rows], vocab_map, mode, settings.temperature),
        lambda logits, targets: cached_student_divergence(logits, targets, vocab_map, mode, settings),
        settings.chunk_size, student_weight)
