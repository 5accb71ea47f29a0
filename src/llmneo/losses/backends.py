"""Which loss implementation computes a run's loss: chosen once at start-up (fused by default, naive or liger),
and per call (evaluation that keeps logits needs the reference path).

- ``naive`` (reference.py) takes both models' full logits;
- ``fused`` (fused.py) and ``liger`` (liger.py) take their final hidden states and head weights and never build
  B x T x V logits. They read the lm_head weight outside the forward pass, so FSDP2 / ZeRO-3 (which shard it)
  and heads they cannot reproduce (lm_head.py) fall back to naive.
"""

from __future__ import annotations

import logging

from ..errors import ConfigError
from ..lm_head import fused_head_unsupported_reason, output_rows
from .divergences import Divergence
from .fused import fused_distillation_loss
from .liger import liger_distillation_loss, liger_unavailable_reason
from .reference import distillation_loss

logger = logging.getLogger(__name__)

LOSS_FUNCTIONS = {"naive": distillation_loss, "fused": fused_distillation_loss, "liger": liger_distillation_loss}
READS_HIDDEN_STATES = frozenset({"fused", "liger"})  # the others take logits


def choose_loss_impl(requested: str, divergence: Divergence, student, teacher=None, kd_vocab_size: int | None = None,
                     weights_sharded: bool = False) -> str:
    """The implementation to run. ``fused`` falls back to ``naive`` (with a warning) for sharded weights and heads
    it cannot reproduce; ``liger`` is an error when unusable, since it was asked for by name. ``teacher``: the
    loaded teacher, or a list of the loaded teachers (several teachers; liger reads one)."""
    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher] if teacher is not None else []
    teacher = teachers[0] if len(teachers) == 1 else None
    if requested == "naive":
        return requested
    if weights_sharded:
        logger.warning("FSDP2 / ZeRO-3 shard the lm_head weights that the %s loss reads outside the forward pass: "
                       "using the naive loss", requested)
        return "naive"
    reasons = [f"the {role}: {reason}" for role, model in (("student", student), *(("teacher", t) for t in teachers))
               if model is not None and (reason := fused_head_unsupported_reason(model))]
    if reasons and requested == "fused":
        logger.warning("the fused loss cannot reproduce %s; using the naive loss", "; ".join(reasons))
        return "naive"
    if requested == "liger":
        if teacher is None:
            logger.info("Liger's loss needs a teacher; this CE-only method uses the fused head")
            return "fused" if not reasons else "naive"
        student_vocab = output_rows(student)
        reason = "; ".join(reasons) or liger_unavailable_reason(divergence, student_vocab, kd_vocab_size or student_vocab)
        if reason:
            raise ConfigError(f"loss_impl liger cannot be used: {reason}")
    return requested


def impl_for_call(chosen: str, needs_logits: bool) -> str:
    """The implementation of one call: the reference path when the caller wants the model's logits back."""
    return "naive" if needs_logits else chosen
