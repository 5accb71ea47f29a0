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

Each chunk of rows is recomputed in the backward pass (activation checkpointing), so only the rows' hidden
states are kept between forward and backward, never their logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.vocabulary import VocabularyMap
from .contract import LossParts, LossSettings

CROSS_TOKENIZER_MODES = ("exact", "uld", "hybrid")


def mapped_buckets(student_rows: torch.Tensor, teacher_rows: torch.Tensor, vocab_map: VocabularyMap,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-weights over [mapped pairs..., unmapped tail], temperature applied (feed them to a
    divergence at T = 1).

    When only the teacher has unmapped ids, the student cannot express that mass: there is no tail bucket and the
    teacher's mapped tokens are renormalised. When only the student has them, its tail is compared with a teacher
    tail of probability 0 (a finite log-weight, so that no divergence meets 0 * inf)."""
    student = student_rows.float()[:, :vocab_map.student_size] / temperature
    teacher = teacher_rows.float()[:, :vocab_map.teacher_size] / temperature
    student_mapped = student.index_select(1, vocab_map.student_ids)
    teacher_mapped = teacher.index_select(1, vocab_map.teacher_ids)
    student_tail = _tail(student, vocab_map.student_ids)
    if student_tail is None:
        return student_mapped, teacher_mapped
    teacher_tail = _tail(teacher, vocab_map.teacher_ids)
    if teacher_tail is None:
        teacher_tail = teacher.new_full((teacher.shape[0], 1), torch.finfo(torch.float32).min / 4)
    return torch.cat([student_mapped, student_tail], dim=1), torch.cat([teacher_mapped, teacher_tail], dim=1)


def _tail(scaled: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor | None:
    """log of the mass outside the mapped ids (N, 1), or None when every id is mapped."""
    if mapped.numel() >= scaled.shape[1]:
        return None
    return torch.logsumexp(scaled.index_fill(1, mapped, float("-inf")), dim=1, keepdim=True)


def sorted_l1(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Per row, sum |sort(p_s) - sort(p_t)| with both sorted in decreasing order, the shorter padded with zeros."""
    student = student_probs.sort(dim=1, descending=True).values
    teacher = teacher_probs.sort(dim=1, descending=True).values
    width = max(student.shape[1], teacher.shape[1])
    student, teacher = F.pad(student, (0, width - student.shape[1])), F.pad(teacher, (0, width - teacher.shape[1]))
    return (student - teacher).abs().sum(1)


def uld_distance(student_rows: torch.Tensor, teacher_rows: torch.Tensor, vocab_map: VocabularyMap,
                 temperature: float = 1.0) -> torch.Tensor:
    """ULD per row over each model's whole vocabulary (the ids its tokenizer reaches)."""
    student = F.softmax(student_rows.float()[:, :vocab_map.student_size] / temperature, dim=1)
    teacher = F.softmax(teacher_rows.float()[:, :vocab_map.teacher_size] / temperature, dim=1)
    return sorted_l1(student, teacher)


def remainder_uld(student_rows: torch.Tensor, teacher_rows: torch.Tensor, vocab_map: VocabularyMap,
                  temperature: float = 1.0) -> torch.Tensor:
    """The teacher's unmapped mass (constant) times the ULD distance between the renormalised unmapped remainders."""
    student = student_rows.float()[:, :vocab_map.student_size] / temperature
    teacher = teacher_rows.float()[:, :vocab_map.teacher_size] / temperature
    student_rest, teacher_rest = _unmapped(student, vocab_map.student_ids), _unmapped(teacher, vocab_map.teacher_ids)
    if teacher_rest.shape[1] == 0:
        return student.new_zeros(student.shape[0])
    weight = 1.0 - F.softmax(teacher, dim=1).index_select(1, vocab_map.teacher_ids).sum(1)
    return weight.detach() * sorted_l1(F.softmax(student_rest, dim=1), F.softmax(teacher_rest, dim=1))


def _unmapped(scaled: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(scaled.shape[1], dtype=torch.bool, device=scaled.device)
    keep[mapped] = False
    return scaled[:, keep]


def cross_vocab_divergence(student_rows: torch.Tensor, teacher_rows: torch.Tensor, vocab_map: VocabularyMap,
                           mode: str, settings: LossSettings) -> torch.Tensor:
    """The divergence per aligned row (N,), before the T^2 factor."""
    temperature = settings.temperature
    if mode == "uld":
        return uld_distance(student_rows, teacher_rows, vocab_map, temperature)
    exact = settings.divergence(*mapped_buckets(student_rows, teacher_rows, vocab_map, temperature), 1.0)
    if mode == "exact":
        return exact
    if mode == "hybrid":
        return exact + remainder_uld(student_rows, teacher_rows, vocab_map, temperature)
    raise ValueError(f"unknown cross_tokenizer mode {mode!r}; expected one of {CROSS_TOKENIZER_MODES}")


def _logit_rows(rows: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return rows if weight is None else F.linear(rows, weight)


def cross_vocab_kd_sum(student_rows, teacher_rows, vocab_map: VocabularyMap, mode: str, settings: LossSettings,
                       student_weight=None, teacher_weight=None) -> torch.Tensor:
    """Sum over aligned rows of the divergence. Rows are logits, or hidden states when the head's weight is given
    (then logits are built ``settings.chunk_size`` rows at a time and rebuilt in the backward pass)."""
    total = student_rows.new_zeros((), dtype=torch.float32)

    def chunk_sum(student_chunk, teacher_chunk):
        with torch.no_grad():
            teacher_logits = _logit_rows(teacher_chunk, teacher_weight)
        return cross_vocab_divergence(_logit_rows(student_chunk, student_weight), teacher_logits, vocab_map, mode,
                                      settings).sum()

    for start in range(0, student_rows.shape[0], settings.chunk_size):
        stop = start + settings.chunk_size
        if torch.is_grad_enabled() and student_rows.requires_grad:
            total = total + checkpoint(chunk_sum, student_rows[start:stop], teacher_rows[start:stop],
                                       use_reentrant=False)
        else:
            total = total + chunk_sum(student_rows[start:stop], teacher_rows[start:stop])
    return total


def cross_tokenizer_parts(ce_parts: LossParts, kd_sum: torch.Tensor, num_items, settings: LossSettings) -> LossParts:
    """The loss from the student's CE-only parts and the summed cross-tokenizer divergence."""
    kd = kd_sum * settings.temperature**2 / num_items
    loss = settings.mix(ce_parts.loss, kd, has_teacher=True)
    return LossParts(loss=loss, ce=ce_parts.ce, kd=kd.detach())
