"""The sampled reverse-KL term (losses/sampled.py): chunked token log-probabilities and their gradients against
autograd through full logits; the term's value and score-function gradient against a naive expression."""

from __future__ import annotations

import torch

from llmneo.losses.sampled import sampled_reverse_kl, token_log_probs


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
