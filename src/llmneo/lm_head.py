"""The output head of a causal LM: whether the fused loss can stand in for it, and the hidden states it reads.

The fused loss replaces ``logits = lm_head(hidden)``. That is exact only when the head is a plain linear layer and
the model changes nothing after it, so models with a wrapped head (e.g. LoRA on lm_head) or a post-head transform
(Gemma-2 soft-capping, Cohere's logit scale, Granite's logit scaling) keep the naive path.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

# Config fields of architectures that transform the logits after lm_head.
POST_HEAD_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The module that maps final hidden states to logits (through PEFT and DDP wrappers)."""
    model = getattr(model, "module", model)
    return model.get_output_embeddings()


def output_rows(model: torch.nn.Module) -> int:
    """The number of ids the output head scores; ZeRO-3 leaves an empty local weight and keeps the full shape
    in ``ds_shape``."""
    weight = output_head(model).weight
    return getattr(weight, "ds_shape", weight.shape)[0]


def fused_head_unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the fused loss cannot reproduce this model's logits, or None when it can."""
    head = output_head(model)
    if type(head) is not torch.nn.Linear:
        return f"its output head is a {type(head).__name__}, not a plain Linear layer"
    weight = head.weight
    if hasattr(weight, "placements") or hasattr(weight, "ds_id") or weight.numel() == 0:  # DTensor / ZeRO-3
        return "its lm_head weight is sharded (FSDP2 or ZeRO-3)"
    config = getattr(getattr(model, "module", model), "config", None)
    for field in POST_HEAD_FIELDS:
        value = getattr(config, field, None)
        if value not in (None, 1, 1.0):
            return f"its config sets {field}={value}, a transform after lm_head"
    return None


@dataclass
class CapturedHidden:
    hidden: torch.Tensor | None = None


@contextmanager
def capture_final_hidden(model: torch.nn.Module, active: bool = True):
    """Inside the block, a forward pass records the head's input and the head computes logits for no position.

    The model still runs its own forward (so DDP, PEFT and gradient checkpointing see a normal call) but returns
    logits of length 0: the fused loss builds them chunk by chunk from the recorded hidden states instead.
    With ``active=False`` nothing is captured and the model returns its logits as usual.
    """
    captured = CapturedHidden()
    if not active:
        yield captured
        return

    def record_and_skip(_module, args):
        captured.hidden = args[0]
        return (args[0].narrow(-2, 0, 0), *args[1:])

    handle = output_head(model).register_forward_pre_hook(record_and_skip)
    try:
        yield captured
    finally:
        handle.remove()
