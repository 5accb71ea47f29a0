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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.vocabulary import VocabularyMap
from .contract import LossParts, LossSettings

CROSS_TOKENIZER_MODES = ("exact", "uld", "hybrid")


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


@torch.no_grad()
def teacher_targets(teacher_rows: torch.Tensor, vocab_map: VocabularyMap, mode: str,
                    temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """What the divergence needs of the teacher, built once per chunk of rows without gradient and far smaller
    than its logits: bucket log-weights (exact, hybrid), the sorted head of its probabilities at the student's
    width and the mass past it (uld), and for hybrid the same of its renormalised unmapped remainder with the
    teacher's unmapped mass as weight."""
    if mode not in CROSS_TOKENIZER_MODES:
        raise ValueError(f"unknown cross_tokenizer mode {mode!r}; expected one of {CROSS_TOKENIZER_MODES}")
    scaled = scaled_rows(teacher_rows, vocab_map.teacher_size, temperature)
    targets = {}
    if mode in ("exact", "hybrid"):
        targets["buckets"] = teacher_buckets(scaled, vocab_map)
    if mode == "uld":
        targets["head"], targets["rest"] = sorted_head(F.softmax(scaled, dim=1), vocab_map.student_size)
    if mode == "hybrid" and len(vocab_map) < vocab_map.teacher_size:
        remainder = unmapped_columns(scaled, vocab_map.teacher_ids)
        student_unmapped = vocab_map.student_size - len(vocab_map)
        targets["remainder_head"], targets["remainder_rest"] = sorted_head(F.softmax(remainder, dim=1),
                                                                           max(student_unmapped, 1))
        mapped_mass = F.softmax(scaled, dim=1).index_select(1, vocab_map.teacher_ids).sum(1)
        targets["remainder_weight"] = 1.0 - mapped_mass
    return targets


def remainder_distance(scaled: torch.Tensor, targets: dict[str, torch.Tensor], vocab_map: VocabularyMap) -> torch.Tensor:
    """hybrid's second term per row: ULD between the student's renormalised unmapped remainder and the teacher's
    (``remainder_head``/``remainder_rest``), weighted by the teacher's unmapped mass."""
    remainder = unmapped_columns(scaled, vocab_map.student_ids)
    student_rest = F.softmax(remainder, dim=1) if remainder.shape[1] else remainder.new_zeros((remainder.shape[0], 1))
    return targets["remainder_weight"] * sorted_l1(student_rest, targets["remainder_head"], targets["remainder_rest"])


def student_divergence(student_rows: torch.Tensor, targets: dict[str, torch.Tensor], vocab_map: VocabularyMap,
                       mode: str, settings: LossSettings) -> torch.Tensor:
    """The divergence per aligned row (N,) against ``teacher_targets``, before the T^2 factor."""
    scaled = scaled_rows(student_rows, vocab_map.student_size, settings.temperature)
    if mode == "uld":
        return sorted_l1(F.softmax(scaled, dim=1), targets["head"], targets["rest"])
    value = settings.divergence(student_buckets(scaled, vocab_map), targets["buckets"], 1.0)
    if mode == "hybrid" and "remainder_head" in targets:
        value = value + remainder_distance(scaled, targets, vocab_map)
    return value


def cross_vocab_divergence(student_rows: torch.Tensor, teacher_rows: torch.Tensor, vocab_map: VocabularyMap,
                           mode: str, settings: LossSettings) -> torch.Tensor:
    """The divergence per aligned row (N,) from both models' logit rows, before the T^2 factor."""
    targets = teacher_targets(teacher_rows, vocab_map, mode, settings.temperature)
    return student_divergence(student_rows, targets, vocab_map, mode, settings)


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


def cross_vocab_kd_sum(student_rows, teacher_rows, vocab_map: VocabularyMap, mode: str, settings: LossSettings,
                       student_weight=None, teacher_weight=None) -> torch.Tensor:
    """Sum over aligned rows of the divergence. Rows are logits, or hidden states when the head's weight is given
    (then logits are built ``settings.chunk_size`` rows at a time); the teacher's targets are built once per chunk."""
    return chunked_kd_sum(
        student_rows, lambda rows: teacher_targets(logit_rows(teacher_rows[rows], teacher_weight), vocab_map, mode,
                                                   settings.temperature),
        lambda logits, targets: student_divergence(logits, targets, vocab_map, mode, settings),
        settings.chunk_size, student_weight)


def cross_tokenizer_parts(ce_parts: LossParts, kd_sum: torch.Tensor, num_items, settings: LossSettings) -> LossParts:
    """The loss from the student's CE-only parts and the summed cross-tokenizer divergence."""
    kd = kd_sum * settings.temperature**2 / num_items
    loss = settings.mix(ce_parts.loss, kd, has_teacher=True)
    return LossParts(loss=loss, ce=ce_parts.ce, kd=kd.detach())
