"""Padding-free packing (``--packing``): the rows of a micro-batch concatenated into one row, exactly.

transformers' ``DataCollatorWithFlattening`` concatenates the rows, restarts ``position_ids`` at each row and
masks the first label of each row (so no row predicts the next one's first token). Attention must not cross
rows either: flash attention gets the rows' boundaries (``cu_seq_lens``) from the collator. For SDPA, eager and
flex attention, transformers 5 derives the block-diagonal causal mask itself from the restarting ``position_ids``
when no attention mask is passed, in every model whose code builds its masks through ``masking_utils``; only a
model that does not (remote or older modelling code, which would otherwise attend across rows) gets the mask built
here.
"""

from __future__ import annotations

import sys

import torch
from transformers import DataCollatorWithFlattening

from ..losses.contract import IGNORE_INDEX

FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")


class PackingCollator:
    """Flattens each micro-batch into one row; keeps ``row_id`` (the teacher cache's keys) in row order."""

    def __init__(self, attn_implementation: str):
        self.flash = attn_implementation in FLASH_IMPLEMENTATIONS
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                                  return_flash_attn_kwargs=self.flash, return_tensors="pt")

    def __call__(self, features: list[dict]) -> dict:
        row_ids = [feature["row_id"] for feature in features if "row_id" in feature]
        batch = self.flatten([{key: feature[key] for key in ("input_ids", "labels")} for feature in features])
        if row_ids:
            batch["row_id"] = torch.tensor(row_ids)
        return batch


def packed_row_index(position_ids: torch.Tensor) -> torch.Tensor:
    """The 0-based row of each position of a packed row (each row starts where its position is 0)."""
    return torch.cumsum(position_ids[0] == 0, dim=0) - 1


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(1, 1, T, T) boolean mask: position i attends to j <= i of its own row only."""
    positions = position_ids[0]
    row = packed_row_index(position_ids)
    causal = torch.ones(positions.numel(), positions.numel(), dtype=torch.bool, device=positions.device).tril()
    return (causal & (row[:, None] == row[None, :]))[None, None]


MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask")  # transformers.masking_utils


def derives_packed_attention(model) -> bool:
    """Whether the model's code builds its attention masks with transformers' masking_utils, which turn restarting
    ``position_ids`` (and no attention mask) into the block-diagonal causal mask."""
    model = getattr(model, "module", model)  # DDP
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    modelling = sys.modules.get(type(base).__module__)
    return any(hasattr(modelling, name) for name in MASK_BUILDERS)


def packed_model_inputs(inputs: dict, model) -> dict:
    """What a packed batch passes to ``model``'s forward (student and teacher alike)."""
    implementation = getattr(model, "module", model).config._attn_implementation
    model_inputs = {"input_ids": inputs["input_ids"], "position_ids": inputs["position_ids"]}
    if implementation in FLASH_IMPLEMENTATIONS:
        model_inputs.update({key: inputs[key] for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                                          "max_length_k") if key in inputs})
        return model_inputs
    if derives_packed_attention(model):
        return model_inputs
    model = getattr(model, "module", model)
    allowed = block_causal_mask(inputs["position_ids"])
    if implementation == "sdpa":
        model_inputs["attention_mask"] = allowed
    else:  # eager attention adds the mask to the scores
        model_inputs["attention_mask"] = torch.zeros(allowed.shape, dtype=model.dtype, device=allowed.device
                                                     ).masked_fill(~allowed, torch.finfo(model.dtype).min)
    return model_inputs


def forward_inputs(inputs: dict, model) -> dict:
    """The forward inputs of a batch for ``model``: padded rows, or one packed row (positions, row boundaries)."""
    if "position_ids" in inputs:
        return packed_model_inputs(inputs, model)
    return {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask")}
