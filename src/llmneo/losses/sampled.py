"""The sampled reverse-KL term of on-policy steps: per answer token y_t (sampled by the student),
c_t = log p_s(y_t) − log p_t(y_t), logged as the mean over tokens, with gradient c_t (held constant) times
∇ log p_s(y_t) — the score-function gradient of KL(p_s ‖ p_t), no discount, at T = 1.

The student's log-probabilities come from its final hidden states and head a chunk of rows at a time, and the
backward pass recomputes each chunk's logits: no B·T·V logits are kept.
"""

from __future__ import annotations

import torch

from .contract import LossParts, answer_mask, answer_rows, answer_targets


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(h W^T)[y] per row, chunked; backward recomputes the chunk logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int):
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            z = (hidden[rows] @ weight.T).float()
            out[rows] = z.gather(1, targets[rows, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            z = (hidden[rows] @ weight.T).float()
            dz = -torch.softmax(z, dim=-1)
            dz[torch.arange(dz.shape[0], device=dz.device), targets[rows]] += 1.0
            dz *= grad_out[rows, None]
            if grad_hidden is not None:
                grad_hidden[rows] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += dz.T @ hidden[rows].float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def token_log_probs(rows: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None,
                    chunk_size: int = 1024) -> torch.Tensor:
    """log p(y) of each row's target: ``rows`` are hidden states (with the head ``weight``) or logits."""
    if weight is not None:
        return _TokenLogProbs.apply(rows, weight, targets, chunk_size)
    return torch.log_softmax(rows.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


def sampled_reverse_kl(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, num_items) -> LossParts:
    """The term's parts: its value (kd, also the loss's value) and the score-function gradient."""
    items = num_items if num_items is not None else student_log_probs.numel()
    gap = (student_log_probs - teacher_log_probs).detach()
    kd = gap.sum() / items
    surrogate = (gap * (student_log_probs - student_log_probs.detach())).sum() / items
    return LossParts(kd + surrogate, torch.zeros_like(kd), kd)


def answer_log_probs(x: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None, chunk_size: int):
    """log p of every answer token (the shift of contract.py), from hidden states + head or logits."""
    mask = answer_mask(labels)
    return token_log_probs(answer_rows(x, mask), answer_targets(labels, mask), weight, chunk_size)


def span_reverse_kl(student_log_probs: torch.Tensor, mask: torch.Tensor, spans: torch.Tensor,
                    teacher_span_log_probs: torch.Tensor, num_items) -> LossParts:
    """Across tokenizers, on aligned byte spans: span k = (row, a, b) holds the student's prediction positions
    [a, b) of its row (``mask``: answer_mask) and the same bytes the teacher's ``teacher_span_log_probs[k]`` covers.
    The gap g_k = Σ log p_s − log p_t over the span is logged summed over spans per answer token, and each
    student token of span k gets g_k (held constant) times ∇ log p_s: with one tokenizer every span is one token and
    this is ``sampled_reverse_kl``."""
    items = num_items if num_items is not None else student_log_probs.numel()
    per_position = student_log_probs.new_zeros(mask.shape).index_put(tuple(mask.nonzero().T), student_log_probs)
    # A span's sum as a difference of running sums: in float64, or the rows' long sums would swamp the small gaps.
    running = per_position.detach().double().cumsum(1)
    running = torch.cat([running.new_zeros(mask.shape[0], 1), running], dim=1)
    rows, starts, ends = spans.unbind(1)
    gap = (running[rows, ends] - running[rows, starts] - teacher_span_log_probs.double()).to(per_position.dtype)
    advantage = per_position.new_zeros(mask.shape[0], mask.shape[1] + 1)
    advantage.index_put_((rows, starts), gap, accumulate=True)
    advantage.index_put_((rows, ends), -gap, accumulate=True)
    advantage = advantage.cumsum(1)[:, :-1]
    kd = gap.sum() / items
    surrogate = (advantage * (per_position - per_position.detach())).sum() / items
    return LossParts(kd + surrogate, torch.zeros_like(kd), kd)
