"""The loss contract every layer shares: which positions are answers, how logits pair with labels, what a loss
returns, and the settings that define it.

Position t of a causal LM's output predicts the label at t + 1, so the answer mask is taken over ``labels[:, 1:]``
and the rows it selects are those of ``x[:, :-1]``. This is the one place that shift is written: data, losses, the
teacher cache and evaluation all call these functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .divergences import Divergence, get_divergence

IGNORE_INDEX = -100  # label of every token the loss does not train on (prompts, padding, packing separators)


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T - 1) booleans: which positions of ``x[:, :-1]`` predict an answer token."""
    return labels[:, 1:] != IGNORE_INDEX


def answer_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of ``x[:, :-1]`` (logits or hidden states) at the positions selected by ``answer_mask``."""
    return x[:, :-1][mask]


def answer_row_index(mask: torch.Tensor) -> torch.Tensor:
    """For each answer row (in ``answer_rows`` order), the batch row it comes from."""
    return mask.nonzero()[:, 0]


def answer_targets(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The answer tokens those rows predict, in the same order."""
    return labels[:, 1:][mask]


def count_answer_tokens(labels) -> int:
    """Answer tokens of one row's labels (a list, numpy array or 1-D tensor): positions 1.. not ignored."""
    if isinstance(labels, list):
        return sum(label != IGNORE_INDEX for label in labels[1:])
    return int((labels[1:] != IGNORE_INDEX).sum())


@dataclass
class LossParts:
    loss: torch.Tensor  # what is back-propagated
    ce: torch.Tensor  # detached, normalised CE contribution of this micro-batch
    kd: torch.Tensor  # detached, normalised T^2 * divergence contribution of this micro-batch
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # further logged terms (e.g. kd_loss/NAME), detached


@dataclass(frozen=True)
class LossSettings:
    """How the loss is defined: ``alpha * CE + (1 - alpha) * T^2 * divergence`` over answer tokens."""

    alpha: float = 0.5  # weight of CE; 1 - alpha weights T^2 * divergence
    temperature: float = 1.0  # T, applied to both models' logits in the divergence
    divergence: Divergence = field(default_factory=get_divergence)  # the KD divergence, parameters bound
    kd_vocab_size: int | None = None  # logits compared by the KD term (the shared vocabulary); None = all
    chunk_size: int = 1024  # answer rows whose fp32 logits are built at once
    tail_mode: str = "bucket"  # how cached top-k rows treat the rest of the vocabulary (topk.py)

    @classmethod
    def from_args(cls, args, kd_vocab_size: int | None = None) -> LossSettings:
        """The settings of a run's distillation options (NeoTrainingArguments / DistillArguments fields)."""
        divergence = get_divergence(args.divergence, args.jsd_beta, args.skew_lambda, args.akl_mu)
        return cls(args.alpha, args.temperature, divergence, kd_vocab_size, args.kd_chunk_size, args.cache_tail)

    def mix(self, ce: torch.Tensor, kd: torch.Tensor, has_teacher: bool) -> torch.Tensor:
        """The loss from its normalised terms; CE alone when there is no teacher."""
        return self.alpha * ce + (1.0 - self.alpha) * kd if has_teacher else ce


DEFAULT_LOSS_SETTINGS = LossSettings()  # frozen: safe to share as a default argument
