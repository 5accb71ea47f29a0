"""The teacher's signal computed on the fly: one forward pass without gradients, cache or labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lm_head import capture_final_hidden, fused_head_unsupported_reason, output_head
from ..losses.contract import answer_rows
from ..losses.sampled import token_log_probs


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


@torch.no_grad()
def answer_logit_chunks(model: torch.nn.Module, batch: dict, mask: torch.Tensor, chunk_size: int,
                        vocab: int | None = None):
    """A model's fp32 logits at the batch's answer positions (``mask``, shifted), ``chunk_size`` rows at a time,
    over the first ``vocab`` ids: built from the final hidden states, or from full logits for heads the fused loss
    cannot reproduce. For evaluation and the teacher cache."""
    input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
    if fused_head_unsupported_reason(model) is None:
        hidden = answer_rows(teacher_final_hidden(model, input_ids, attention_mask), mask)
        weight = output_head(model).weight
        weight = weight[:vocab] if vocab else weight
        for chunk in hidden.split(chunk_size):
            yield F.linear(chunk, weight).float()
    else:
        rows = answer_rows(teacher_logits(model, input_ids, attention_mask), mask)
        for chunk in rows.split(chunk_size):
            yield (chunk[:, :vocab] if vocab else chunk).float()


@torch.no_grad()
def rows_at(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            rows: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A model without gradient at (row, position) pairs of its own batch: final hidden states and its head weight,
    or logit rows (and None) for heads the fused loss cannot reproduce (``losses.cross_vocab.logit_rows`` turns
    either into logits). For the teacher's side across tokenizers, and for evaluation at aligned boundaries."""
    if fused_head_unsupported_reason(model) is None:
        return teacher_final_hidden(model, input_ids, attention_mask)[rows, positions], output_head(model).weight
    return teacher_logits(model, input_ids, attention_mask)[rows, positions], None


def span_log_probs(model: torch.nn.Module, teacher: dict, spans) -> torch.Tensor:
    """``model``'s log-probability of each aligned byte span (``data.collators.rendered_answers``: its rows in
    ``teacher``, span k predicting tokens teacher_start + 1 .. teacher_end of its row), summed over its tokens."""
    ids = teacher["teacher_input_ids"]
    lengths = spans.teacher_end - spans.teacher_start
    span_of = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    within = torch.arange(len(span_of)) - (lengths.cumsum(0) - lengths)[span_of]
    rows, positions = spans.row[span_of].to(ids.device), (spans.teacher_start[span_of] + within).to(ids.device)
    found, weight = rows_at(model, ids, teacher["teacher_attention_mask"], rows, positions)
    theirs = token_log_probs(found, ids[rows, positions + 1], weight)
    return theirs.new_zeros(len(lengths)).index_add(0, span_of.to(theirs.device), theirs)
