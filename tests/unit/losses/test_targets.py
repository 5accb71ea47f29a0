"""losses/targets.py: both teacher target types give the loss of their definition; with one tokenizer, aligned
targets at every answer position equal the token-level ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmneo.losses.contract import IGNORE_INDEX, LossSettings, answer_mask
from llmneo.losses.cross_vocab import from_logit_rows
from llmneo.losses.cross_vocab_modes import cross_vocab_mode
from llmneo.losses.targets import AlignedTargets, Logits, StudentSide, TokenTargets
from llmneo.losses.vocab_map import VocabularyMap


def setup():
    torch.manual_seed(0)
    labels = torch.randint(0, 9, (2, 7))
    labels[0, :2] = labels[1, :4] = IGNORE_INDEX
    return torch.randn(2, 7, 9, requires_grad=True), torch.randn(2, 7, 9), labels


def naive(student, teacher, labels, settings: LossSettings, items: int):
    mask = answer_mask(labels)
    s, t, y = student[:, :-1][mask], teacher[:, :-1][mask], labels[:, 1:][mask]
    ce = F.cross_entropy(s, y, reduction="sum") / items
    T = settings.temperature
    kl = (F.softmax(t / T, -1) * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum() * T**2 / items
    return settings.alpha * ce + (1 - settings.alpha) * kl


def test_token_targets_are_the_standard_loss():
    student, teacher, labels = setup()
    settings = LossSettings(alpha=0.3, temperature=2.0)
    parts = TokenTargets(Logits(teacher)).loss(StudentSide("naive", student), labels, settings, 11)
    torch.testing.assert_close(parts.loss, naive(student, teacher, labels, settings, 11))
    ce_only = TokenTargets().loss(StudentSide("naive", student), labels, settings, 11)
    torch.testing.assert_close(ce_only.loss, F.cross_entropy(student[:, :-1][answer_mask(labels)],
                                                             labels[:, 1:][answer_mask(labels)], reduction="sum") / 11)


def test_aligned_targets_at_every_answer_position_with_one_vocabulary_equal_token_targets():
    student, teacher, labels = setup()
    settings = LossSettings(alpha=0.3, temperature=2.0, chunk_size=3)
    rows, positions = answer_mask(labels).nonzero(as_tuple=True)
    identity = VocabularyMap(torch.arange(9), torch.arange(9), 9, 9, identical=True)
    aligned = AlignedTargets(rows, positions, from_logit_rows(teacher[rows, positions], identity, cross_vocab_mode("exact")),
                             identity)
    ours = aligned.loss(StudentSide("naive", student), labels, settings, None)
    expected = naive(student, teacher, labels, settings, int(answer_mask(labels).sum()))
    torch.testing.assert_close(ours.loss, expected)
    torch.testing.assert_close(torch.autograd.grad(ours.loss, student)[0],
                               torch.autograd.grad(expected, student)[0])
