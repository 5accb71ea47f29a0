"""The teacher's signal computed on the fly: one forward pass without gradients, cache or labels."""

from __future__ import annotations

import torch

from ..lm_head import capture_final_hidden


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   **model_inputs) -> torch.Tensor:
    """Full (B, T, V) logits, for the naive loss (``model_inputs``: position_ids etc. of packed batches)."""
    # no_grad rather than inference_mode: the KD backward saves these logits for the student's gradient.
    return teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_inputs).logits


@torch.no_grad()
def teacher_final_hidden(teacher: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         **model_inputs) -> torch.Tensor:
    """(B, T, H) final hidden states, for the fused loss: the teacher's logits are never built in full."""
    with capture_final_hidden(teacher) as captured:
        teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_inputs)
    return captured.hidden
