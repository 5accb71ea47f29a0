"""The cross-vocabulary modes are a registry of types (losses/cross_vocab_modes.py): the config's choices name the same
set, an unknown name is refused naming the choices, and each mode's targets compute their own divergence."""

from __future__ import annotations

import typing

import pytest
import torch
import torch.nn.functional as F

from llmneo.config import DistillArguments
from llmneo.losses.contract import LossSettings
from llmneo.losses.cross_vocab_modes import (CROSS_VOCAB_MODES, BucketTargets, HybridTargets, SortedTargets,
                                             cross_vocab_mode, student_divergence, teacher_targets)
from llmneo.losses.vocab_map import VocabularyMap


def test_the_config_offers_exactly_the_registered_modes():
    choices = typing.get_args(typing.get_args(typing.get_type_hints(DistillArguments)["cross_tokenizer"])[0])
    assert set(choices) == set(CROSS_VOCAB_MODES)


def test_an_unknown_mode_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown cross_tokenizer mode 'sorted'; expected one of \['exact', 'hybrid', 'uld'\]"):
        cross_vocab_mode("sorted")


@pytest.mark.parametrize(("name", "kind"), [("exact", BucketTargets), ("uld", SortedTargets), ("hybrid", HybridTargets)])
def test_each_mode_builds_its_own_targets(name, kind):
    mapping = VocabularyMap(torch.tensor([3, 0, 9, 5]), torch.tensor([1, 4, 0, 6]), 11, 7)
    assert isinstance(teacher_targets(torch.randn(3, 11), mapping, cross_vocab_mode(name)), kind)


def test_exact_with_one_vocabulary_is_the_plain_divergence():
    """The identity map: nothing unmapped, no tail bucket, and exact is forward KL of the tempered rows."""
    torch.manual_seed(0)
    identity = VocabularyMap(torch.arange(6), torch.arange(6), 6, 6, identical=True)
    student, teacher = torch.randn(4, 6), torch.randn(4, 6)
    settings = LossSettings(temperature=2.0)
    ours = student_divergence(student, teacher_targets(teacher, identity, cross_vocab_mode("exact"), 2.0), identity,
                              settings)
    p_teacher = F.softmax(teacher / 2.0, -1)
    expected = (p_teacher * (p_teacher.log() - F.log_softmax(student / 2.0, -1))).sum(-1)
    torch.testing.assert_close(ours, expected)
