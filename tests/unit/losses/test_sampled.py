"""The sampled reverse-KL term (losses/sampled.py): chunked token log-probabilities and their gradients against
autograd through full logits; the term's value and score-function gradient against a naive expression."""

from __future__ import annotations

import pytest
import torch

from llmneo.losses.sampled import sampled_reverse_kl, span_reverse_kl, token_log_probs


def test_chunked_log_probs_and_gradients_equal_autograd():
    torch.manual_seed(0)
    hidden = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 30, (11,))
    upstream = torch.randn(11, dtype=torch.float64)
    ours = token_log_probs(hidden, targets, weight, chunk_size=4)
    grad_hidden, grad_weight = torch.autograd.grad((ours * upstream).sum(), (hidden, weight))
    reference = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)
    ref_hidden, ref_weight = torch.autograd.grad((reference * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(ours.double(), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_hidden, ref_hidden, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_weight, ref_weight, rtol=1e-6, atol=1e-6)


def test_value_is_the_mean_gap_and_gradient_the_score_function():
    torch.manual_seed(1)
    logits = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 12, (5,))
    teacher = torch.log_softmax(torch.randn(5, 12, dtype=torch.float64), -1).gather(1, targets[:, None]).squeeze(1)
    student = token_log_probs(logits, targets)
    parts = sampled_reverse_kl(student, teacher, num_items=8)  # 8 tokens in the whole optimizer step
    gap = (student - teacher).detach()
    assert float(parts.loss) == float(parts.kd) == float(gap.sum() / 8)
    (grad,) = torch.autograd.grad(parts.loss, logits, retain_graph=True)
    (expected,) = torch.autograd.grad((gap * student).sum() / 8, logits)  # c_t held constant times grad log p_s
    torch.testing.assert_close(grad, expected)
    assert float(parts.ce) == 0.0


def test_span_estimator_against_a_loop_over_spans_and_single_token_spans():
    """Across tokenizers: each span's gap (student tokens in it minus the teacher's total) times the gradient of
    the student's log-probability of its tokens, written as a loop; one-token spans are sampled_reverse_kl."""
    torch.manual_seed(0)
    mask = torch.tensor([[False, True, True, True, True, True], [False, False, True, True, True, False]])
    ours_lp = (-torch.rand(int(mask.sum()), dtype=torch.float64) * 3).requires_grad_()
    spans = torch.tensor([[0, 1, 3], [0, 3, 4], [0, 4, 6], [1, 2, 5]])  # row 0's position 4..5 and row 1 whole
    teacher = -torch.rand(4, dtype=torch.float64) * 6
    parts = span_reverse_kl(ours_lp, mask, spans, teacher, num_items=torch.tensor(8))
    by_position = torch.zeros(mask.shape, dtype=torch.float64).index_put(tuple(mask.nonzero().T), ours_lp)
    value, surrogate = 0.0, 0.0
    for (row, start, end), theirs in zip(spans.tolist(), teacher, strict=True):
        span = by_position[row, start:end].sum()
        gap = float(span.detach() - theirs)
        value += gap
        surrogate = surrogate + gap * span
    assert float(parts.kd) == pytest.approx(value / 8, rel=1e-12)
    (expected,) = torch.autograd.grad(surrogate / 8, ours_lp)
    (grad,) = torch.autograd.grad(parts.loss, ours_lp)
    torch.testing.assert_close(grad, expected)
    single = torch.tensor([[0, p, p + 1] for p in range(1, 6)])
    teacher_tokens = -torch.rand(5, dtype=torch.float64)
    one_row = mask[:1]
    lp = ours_lp[:5].detach().clone().requires_grad_()
    spanned, plain = span_reverse_kl(lp, one_row, single, teacher_tokens, None), sampled_reverse_kl(lp, teacher_tokens, None)
    torch.testing.assert_close(spanned.kd, plain.kd)
    torch.testing.assert_close(torch.autograd.grad(spanned.loss, lp)[0], torch.autograd.grad(plain.loss, lp)[0])
