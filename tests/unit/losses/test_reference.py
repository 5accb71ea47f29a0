"""The CE+KD loss against a naive per-token implementation written here (values and gradients, fp32)."""

import math

import pytest
import torch

from llmneo.losses.contract import LossSettings
from llmneo.losses.reference import distillation_loss
from llmneo.losses.divergences import forward_kl


def naive_loss(student_logits, teacher_logits, labels, alpha, temperature, num_items=None, vocab=None):
    """Loop over every (row, position) pair; position t predicts labels[t + 1]."""
    batch, length, _ = student_logits.shape
    vocab = vocab or student_logits.shape[-1]
    ce_total, kd_total, count = 0.0, 0.0, 0
    for b in range(batch):
        for t in range(length - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            count += 1
            z_s = student_logits[b, t]
            ce_total = ce_total - (z_s[target] - torch.logsumexp(z_s, 0))
            if teacher_logits is not None:
                s = z_s[:vocab] / temperature
                q = teacher_logits[b, t, :vocab] / temperature
                p_t = torch.exp(q - torch.logsumexp(q, 0))
                log_p_s = s - torch.logsumexp(s, 0)
                log_p_t = q - torch.logsumexp(q, 0)
                kd_total = kd_total + (p_t * (log_p_t - log_p_s)).sum() * temperature**2
    denominator = num_items if num_items is not None else count
    ce, kd = ce_total / denominator, kd_total / denominator
    return (alpha * ce + (1 - alpha) * kd) if teacher_logits is not None else ce


def make_inputs(seed=0, batch=3, length=7, vocab=11):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=generator) * 2
    teacher = torch.randn(batch, length, vocab, generator=generator) * 2
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[0, :3] = -100  # prompt
    labels[1, 5:] = -100  # padding
    labels[2, ::2] = -100  # interleaved (several assistant turns)
    return student, teacher, labels


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_loss_and_gradients_match_naive(alpha, temperature):
    student, teacher, labels = make_inputs()
    ours_in = student.clone().requires_grad_(True)
    naive_in = student.clone().requires_grad_(True)
    ours = distillation_loss(ours_in, labels, teacher, settings=LossSettings(alpha=alpha, temperature=temperature, chunk_size=4))
    reference = naive_loss(naive_in, teacher, labels, alpha, temperature)
    ours.loss.backward()
    reference.backward()
    torch.testing.assert_close(ours.loss, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_in.grad, naive_in.grad, atol=1e-5, rtol=1e-5)


def test_parts_are_ce_and_scaled_kd():
    student, teacher, labels = make_inputs(seed=1)
    parts = distillation_loss(student, labels, teacher, settings=LossSettings(alpha=0.3, temperature=2.0))
    ce_only = naive_loss(student, None, labels, 1.0, 1.0)
    kd_only = naive_loss(student, teacher, labels, 0.0, 2.0)
    torch.testing.assert_close(parts.ce, ce_only, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts.kd, kd_only, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts.loss, 0.3 * ce_only + 0.7 * kd_only, atol=1e-5, rtol=1e-5)


def test_kd_mask_is_shifted_with_the_labels():
    """Teacher equals student exactly where an answer token is predicted (position t for label t+1) and differs
    everywhere else: KD must be 0. An unshifted mask would read the differing positions."""
    torch.manual_seed(0)
    student = torch.randn(1, 6, 9)
    teacher = torch.randn(1, 6, 9) * 5
    labels = torch.full((1, 6), -100)
    labels[0, 3:5] = torch.tensor([2, 7])  # answer tokens at positions 3, 4: predicted from positions 2, 3
    teacher[0, 2:4] = student[0, 2:4]
    parts = distillation_loss(student, labels, teacher, settings=LossSettings(alpha=0.0))
    assert parts.kd.item() == pytest.approx(0.0, abs=1e-7)
    unshifted_positions = forward_kl(student[0, 3:5], teacher[0, 3:5]).sum()
    assert unshifted_positions.item() > 0.1  # the wrong positions would give a clearly non-zero KD


def test_normalised_by_given_token_count_and_chunking_invariant():
    student, teacher, labels = make_inputs(seed=2)
    whole = distillation_loss(student, labels, teacher, num_items=40, settings=LossSettings(chunk_size=1000))
    tiny_chunks = distillation_loss(student, labels, teacher, num_items=40, settings=LossSettings(chunk_size=1))
    reference = naive_loss(student, teacher, labels, 0.5, 1.0, num_items=40)
    torch.testing.assert_close(whole.loss, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny_chunks.loss, reference, atol=1e-5, rtol=1e-5)


def test_kd_over_shared_vocabulary_only():
    student, teacher, labels = make_inputs(seed=3, vocab=13)
    labels = labels.clamp(max=9).masked_fill(labels == -100, -100)
    parts = distillation_loss(student, labels, teacher, settings=LossSettings(alpha=0.0, kd_vocab_size=10))
    reference = naive_loss(student, teacher, labels, 0.0, 1.0, vocab=10)
    torch.testing.assert_close(parts.loss, reference, atol=1e-5, rtol=1e-5)


def test_forward_kl_zero_teacher_probabilities_are_finite():
    student = torch.randn(2, 5)
    teacher = torch.tensor([[0.0, -math.inf, 1.0, -math.inf, 2.0], [3.0, 0.0, 0.0, 0.0, 0.0]])
    kl = forward_kl(student, teacher)
    assert torch.isfinite(kl).all() and (kl >= 0).all()


def test_ce_only_without_teacher():
    student, _, labels = make_inputs(seed=4)
    parts = distillation_loss(student, labels, None, settings=LossSettings(alpha=0.5))
    torch.testing.assert_close(parts.loss, naive_loss(student, None, labels, 1.0, 1.0), atol=1e-5, rtol=1e-5)
    assert parts.kd.item() == 0.0
