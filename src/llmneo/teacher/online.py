"""The teacher's signal computed on the fly: one forward pass without gradients, cache or labels."""

from __future__ import annotations

import torch


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    # no_grad rather than inference_mode: the KD backward saves these logits for the student's gradient.
    return teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
