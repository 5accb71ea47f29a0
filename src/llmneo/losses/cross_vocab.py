"""The KD term between a teacher and a student with different vocabularies (``--cross_tokenizer``).

It is computed at aligned boundaries only (data/alignment.py), on rows of both models' logits there, and added to
the student's CE on all of its answer tokens: ``alpha * CE + (1 - alpha) * T^2 * sum(D) / num_items``, with
``num_items`` the student's answer tokens of the optimizer step, as in the one-tokenizer loss. ``D`` is one of the
modes of cross_vocab_modes.py (exact, uld, hybrid), each a type that builds the teacher's targets.

Per chunk of rows the teacher's side is reduced once, without gradient, to the mode's targets, from its logit rows
(``from_logit_rows``) or its cached top-k in its own ids (``from_topk``, ``cache-teacher --cross_tokenizer``), and
the student's logits are rebuilt in the backward pass (activation checkpointing), so neither model's full logits are
kept between forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .contract import LossParts, LossSettings
from .cross_vocab_modes import CrossVocabMode, CrossVocabTargets, cached_teacher_targets, student_divergence, teacher_targets
from .topk import TopKRows
from .vocab_map import VocabularyMap


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


def from_logit_rows(teacher_rows: torch.Tensor, vocab_map: VocabularyMap, mode: CrossVocabMode,
                    teacher_weight: torch.Tensor | None = None) -> ChunkTargets:
    """The teacher's targets chunk by chunk from its rows: logits, or hidden states with its head's weight."""
    return lambda rows, temperature: teacher_targets(logit_rows(teacher_rows[rows], teacher_weight), vocab_map, mode,
                                                     temperature)


def from_topk(topk: TopKRows, vocab_map: VocabularyMap, mode: CrossVocabMode) -> ChunkTargets:
    """The teacher's targets chunk by chunk from its cached top-k rows."""
    return lambda rows, temperature: cached_teacher_targets(topk[rows], vocab_map, mode, temperature)


def cross_vocab_kd_sum(student_rows: torch.Tensor, teacher: ChunkTargets, vocab_map: VocabularyMap,
                       settings: LossSettings, student_weight=None) -> torch.Tensor:
    """Sum over aligned rows of the divergence. The student's rows are logits, or hidden states when its head's
    weight is given (then logits are built ``settings.chunk_size`` rows at a time); ``teacher`` builds the
    teacher's targets of each chunk once (``from_logit_rows``, ``from_topk``)."""
    return chunked_kd_sum(student_rows, lambda rows: teacher(rows, settings.temperature),
                          lambda logits, targets: student_divergence(logits, targets, vocab_map, settings),
                          settings.chunk_size, student_weight)


def cross_tokenizer_parts(ce_parts: LossParts, kd_sum: torch.Tensor, num_items, settings: LossSettings) -> LossParts:
    """The loss from the student's CE-only parts and the summed cross-tokenizer divergence."""
    kd = kd_sum * settings.temperature**2 / num_items
    loss = settings.mix(ce_parts.loss, kd, has_teacher=True)
    return LossParts(loss=loss, ce=ce_parts.ce, kd=kd.detach())
