"""teacher/sources.py: what each teacher source gives the loss for a batch, and how it refuses a batch its teacher
signal does not fit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llmneo.demo.tiny import build_tiny_llama
from llmneo.errors import DataError
from llmneo.losses.contract import IGNORE_INDEX
from llmneo.losses.cross_vocab_modes import cross_vocab_mode
from llmneo.losses.targets import AlignedTargets, StudentSide, TokenTargets
from llmneo.losses.topk import TopKRows
from llmneo.losses.vocab_map import VocabularyMap
from llmneo.teacher.placement import place_teacher
from llmneo.teacher.sources import AlignedCachedTeacher, CachedTeacher, OnlineTeacher


def batch(rows=2, length=6, answers=(3, 2)):
    labels = torch.full((rows, length), IGNORE_INDEX)
    for row, count in enumerate(answers):
        labels[row, length - count:] = 7
    return {"input_ids": torch.randint(0, 50, (rows, length)), "attention_mask": torch.ones(rows, length, dtype=torch.long),
            "labels": labels, "row_id": torch.arange(rows)}


class FakeCache:
    """A cache holding ``counts[row]`` rows per training row (and student positions for an aligned cache)."""

    cache_dir = "cache/dir"

    def __init__(self, counts, positions=None):
        self.counts, self.positions = counts, positions
        self.manifest = {"shards": [{"sha256": "abc"}]}

    def row_answer_tokens(self, row):
        return self.counts[row]

    def rows(self, row_ids):
        total = sum(self.counts[row] for row in row_ids)
        return TopKRows(torch.zeros(total, 2, dtype=torch.long), torch.zeros(total, 2), torch.zeros(total))

    def student_positions(self, row_ids):
        return [torch.tensor(self.positions[row]) for row in row_ids]


@pytest.mark.parametrize("hidden_states", [True, False])
def test_the_online_teacher_gives_its_hidden_states_or_its_logits(tokenizer, hidden_states):
    teacher = build_tiny_llama(tokenizer, hidden_size=32, seed=3).eval()
    inputs = batch()
    student = StudentSide("fused", torch.zeros(2, 6, 32), torch.zeros(5, 32)) if hidden_states else \
        StudentSide("naive", torch.zeros(2, 6, 5))
    targets = OnlineTeacher(teacher, None).targets(inputs, student)
    with torch.no_grad():
        output = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         output_hidden_states=True)
    assert isinstance(targets, TokenTargets)
    if hidden_states:
        assert targets.teacher.weight is teacher.lm_head.weight
        torch.testing.assert_close(targets.teacher.hidden, output.hidden_states[-1])
    else:
        torch.testing.assert_close(targets.teacher.logits, output.logits)


def test_the_cache_gives_the_rows_of_the_batch_and_refuses_other_data():
    targets = CachedTeacher(FakeCache({0: 3, 1: 2}), 50).targets(batch(), StudentSide("naive", torch.zeros(1)))
    assert len(targets.teacher.rows) == 5
    with pytest.raises(DataError, match=r"teacher cache cache/dir holds 4 answer tokens for training row 0 but the "
                                        r"batch has 3: it was captured from other data"):
        CachedTeacher(FakeCache({0: 4, 1: 2}), 50).targets(batch(), StudentSide("naive", torch.zeros(1)))


def test_a_cache_adds_its_contents_to_the_run_identity():
    first, recaptured = FakeCache({}), FakeCache({})
    recaptured.manifest = {"shards": [{"sha256": "def"}]}
    assert CachedTeacher(first, 50).identity() == CachedTeacher(FakeCache({}), 50).identity()
    assert CachedTeacher(first, 50).identity() != CachedTeacher(recaptured, 50).identity()


@pytest.mark.parametrize("side", ["right", "left"])
def test_an_aligned_cache_places_its_boundaries_in_the_padded_batch(side):
    vocab_map = VocabularyMap(torch.arange(3), torch.arange(3), 3, 3)
    inputs = batch()
    if side == "left":  # row 1 is shorter by one token, padded on the left
        inputs["attention_mask"][1, 0] = 0
    cache = FakeCache({0: 2, 1: 1}, {0: [2, 4], 1: [3] if side == "right" else [2]})
    targets = AlignedCachedTeacher(cache, vocab_map, cross_vocab_mode("exact"), side).targets(inputs, StudentSide("naive", torch.zeros(1)))
    assert isinstance(targets, AlignedTargets)
    assert targets.rows.tolist() == [0, 0, 1] and targets.positions.tolist() == [2, 4, 3]
    bad = FakeCache({0: 2, 1: 1}, {0: [0, 4], 1: [3]})  # position 0 predicts a prompt token
    with pytest.raises(DataError, match=r"the aligned boundaries it holds for training row 0 are not answer positions"):
        AlignedCachedTeacher(bad, vocab_map, cross_vocab_mode("exact")).targets(batch(), StudentSide("naive", torch.zeros(1)))


def test_a_teacher_is_moved_to_the_process_device_without_engines(tokenizer):
    teacher = build_tiny_llama(tokenizer, hidden_size=32, seed=3)
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None), is_fsdp2=False,
                                  device=torch.device("cpu"))
    assert place_teacher(teacher, accelerator) is teacher
    teacher.hf_quantizer = object()  # bitsandbytes placed it when loading: left where it is
    assert place_teacher(teacher, SimpleNamespace()) is teacher
