"""Which loss implementation a run uses, decided once at start-up: fused (default), naive or liger."""

from __future__ import annotations

import logging

from ..errors import ConfigError
from ..lm_head import fused_head_unsupported_reason, output_head
from .liger import liger_unavailable_reason

logger = logging.getLogger(__name__)


def choose_loss_impl(requested: str, divergence, student, teacher=None, kd_vocab_size: int | None = None) -> str:
    """The implementation to run. ``fused`` falls back to ``naive`` (with a warning) for heads it cannot
    reproduce; ``liger`` is an error when unusable, since it was asked for by name."""
    if requested == "naive":
        return requested
    reasons = [f"the {role}: {reason}" for role, model in (("student", student), ("teacher", teacher))
               if model is not None and (reason := fused_head_unsupported_reason(model))]
    if reasons and requested == "fused":
        logger.warning("the fused loss cannot reproduce %s; using the naive loss", "; ".join(reasons))
        return "naive"
    if requested == "liger":
        if teacher is None:
            logger.info("Liger's loss needs a teacher; this CE-only method uses the fused head")
            return "fused" if not reasons else "naive"
        student_vocab = output_head(student).weight.shape[0]
        reason = "; ".join(reasons) or liger_unavailable_reason(divergence, student_vocab, kd_vocab_size or student_vocab)
        if reason:
            raise ConfigError(f"loss_impl liger cannot be used: {reason}")
    return requested
