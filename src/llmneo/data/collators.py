"""Batches of tokenized rows: padded to the longest row, labels padded with IGNORE_INDEX (packing: packing.py)."""

from __future__ import annotations

from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

from ..losses.contract import IGNORE_INDEX


def make_collator(tokenizer, task: str = "causal_lm"):
    """Padded batches: token-level rows (labels padded so they train nothing), or texts to classify."""
    if task == "classification":
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
