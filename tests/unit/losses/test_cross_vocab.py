"""The KD term across tokenizers against the teacher's cached top-k (losses/cross_vocab.py, cached_teacher_targets): equal to the
online term when the cache holds every teacher id, and to a naive per-row reading of its definition otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmneo.losses.vocab_map import VocabularyMap
from llmneo.losses.contract import LossSettings
from llmneo.losses.cross_vocab import cross_vocab_kd_sum, from_logit_rows, from_topk
from llmneo.losses.cross_vocab_modes import CROSS_VOCAB_MODES, cached_teacher_targets, student_divergence, teacher_targets
from llmneo.losses.divergences import get_divergence
from llmneo.losses.topk import TopKRows

MAPS = {  # teacher id -> student id pairs, teacher size, student size
    "both sides unmapped": ([3, 0, 9, 5], [1, 4, 0, 6], 11, 7),
    "every student id mapped": ([0, 4, 2, 7], [2, 0, 3, 1], 9, 4),
}


def vocabulary_map(name: str) -> VocabularyMap:
    teacher, student, teacher_size, student_size = MAPS[name]
    return VocabularyMap(torch.tensor(teacher), torch.tensor(student), teacher_size, student_size)


def cached(teacher_logits: torch.Tensor, k: int) -> TopKRows:
    """The teacher's top-k as cache-teacher stores it: log-probabilities at T = 1 and the log of the rest."""
    log_probs = F.log_softmax(teacher_logits.double(), -1)
    top = log_probs.topk(k, dim=-1)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1.0)) if k < log_probs.shape[1] else \
        torch.full((log_probs.shape[0],), float("-inf"), dtype=torch.float64)
    return TopKRows(top.indices, top.values.float(), tail.float())


def divergence_of(student, topk, mapping, mode, settings):
    targets = cached_teacher_targets(topk, mapping, CROSS_VOCAB_MODES[mode], settings.temperature)
    return student_divergence(student, targets, mapping, settings)


@pytest.mark.parametrize("map_name", sorted(MAPS))
@pytest.mark.parametrize("mode", ["exact", "uld", "hybrid"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_cache_of_every_teacher_id_equals_the_online_term(map_name, mode, divergence, temperature):
    mapping = vocabulary_map(map_name)
    torch.manual_seed(0)
    student = torch.randn(6, mapping.student_size, requires_grad=True)
    teacher = torch.randn(6, mapping.teacher_size)
    settings = LossSettings(temperature=temperature, divergence=get_divergence(divergence))
    online = student_divergence(student, teacher_targets(teacher, mapping, CROSS_VOCAB_MODES[mode], temperature), mapping,
                                settings)
    ours = divergence_of(student, cached(teacher, mapping.teacher_size), mapping, mode, settings)
    torch.testing.assert_close(ours, online, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), student)[0],
                               torch.autograd.grad(online.sum(), student)[0], atol=1e-5, rtol=1e-5)


def naive_top_k(student_row, topk, row, mapping, temperature):
    """The definition read row by row: the teacher's k entries and its tail (tempered as one token), the student's
    probabilities at the mapped entries' ids and the rest; forward KL over those buckets, ULD of the sorted
    top-k with the tail's mass past it, and the unmapped entries' remainder."""
    pairs = dict(zip(mapping.teacher_ids.tolist(), mapping.student_ids.tolist(), strict=True))
    weights = [float(value) / temperature for value in topk.log_probs[row]] + [float(topk.log_tail[row]) / temperature]
    teacher_probs = torch.softmax(torch.tensor(weights, dtype=torch.float64), 0)
    student_probs = F.softmax(student_row.double() / temperature, -1)
    ids = topk.token_ids[row].tolist()
    mapped = [(pairs[t], teacher_probs[i]) for i, t in enumerate(ids) if t in pairs]
    unmapped = [teacher_probs[i] for i, t in enumerate(ids) if t not in pairs]
    q_t = [p for _, p in mapped] + [sum(unmapped, torch.zeros((), dtype=torch.float64)) + teacher_probs[-1]]
    q_s = [student_probs[s] for s, _ in mapped]
    q_s.append(1 - sum(q_s, torch.zeros((), dtype=torch.float64)))
    exact = sum(t * (t.log() - s.log()) for s, t in zip(q_s, q_t, strict=True))
    sorted_student = sorted(student_probs, key=lambda x: -x.item())
    sorted_teacher = sorted(teacher_probs[:-1], key=lambda x: -x.item())
    width = max(len(sorted_student), len(sorted_teacher))
    pad = [torch.zeros((), dtype=torch.float64)]
    uld = sum((a - b).abs() for a, b in zip(sorted_student + pad * (width - len(sorted_student)),
                                             sorted_teacher + pad * (width - len(sorted_teacher)), strict=True))
    uld = uld + teacher_probs[-1]
    unmapped_mass = sum(unmapped, torch.zeros((), dtype=torch.float64))
    student_rest = [student_probs[i] for i in range(len(student_probs)) if i not in pairs.values()]
    student_rest = [p / sum(student_rest) for p in student_rest]
    teacher_rest = sorted([p / unmapped_mass for p in unmapped], key=lambda x: -x.item())
    student_rest = sorted(student_rest, key=lambda x: -x.item())
    width = max(len(student_rest), len(teacher_rest))
    remainder = sum((a - b).abs() for a, b in zip(student_rest + pad * (width - len(student_rest)),
                                                   teacher_rest + pad * (width - len(teacher_rest)), strict=True))
    return {"exact": exact, "uld": uld, "hybrid": exact + unmapped_mass * remainder}


@pytest.mark.parametrize("mode", ["exact", "uld", "hybrid"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_top_k_cache_equals_the_naive_definition(mode, temperature):
    mapping = vocabulary_map("both sides unmapped")
    torch.manual_seed(1)
    student = torch.randn(5, mapping.student_size, dtype=torch.float64, requires_grad=True)
    topk = cached(torch.randn(5, mapping.teacher_size) * 2, 6)
    settings = LossSettings(temperature=temperature)
    ours = divergence_of(student, topk, mapping, mode, settings)
    naive = torch.stack([naive_top_k(student[row], topk, row, mapping, temperature)[mode] for row in range(5)])
    torch.testing.assert_close(ours.double(), naive, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), student)[0].double(),
                               torch.autograd.grad(naive.sum(), student)[0], atol=1e-5, rtol=0)


def test_chunked_sum_from_hidden_rows_equals_the_online_sum():
    """Chunks, hidden-state rows with the head's weight, and activation checkpointing change nothing."""
    mapping = vocabulary_map("both sides unmapped")
    torch.manual_seed(2)
    hidden, weight = torch.randn(7, 5, requires_grad=True), torch.randn(mapping.student_size, 5, requires_grad=True)
    teacher = torch.randn(7, mapping.teacher_size)
    settings = LossSettings(chunk_size=3, temperature=2.0)
    hybrid = CROSS_VOCAB_MODES["hybrid"]
    ours = cross_vocab_kd_sum(hidden, from_topk(cached(teacher, mapping.teacher_size), mapping, hybrid), mapping,
                              settings, weight)
    online = cross_vocab_kd_sum(hidden @ weight.T, from_logit_rows(teacher, mapping, hybrid), mapping, settings)
    torch.testing.assert_close(ours, online, atol=1e-5, rtol=1e-5)
    for mine, reference in zip(torch.autograd.grad(ours, (hidden, weight)), torch.autograd.grad(online, (hidden, weight)),
                               strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_rows_whose_buckets_hold_every_student_id_stay_finite(divergence):
    """Every student id mapped and in the row's top-k, yet a smaller k than the teacher's vocabulary: the student's
    rest bucket is empty, and neither the value nor its gradient is NaN."""
    mapping = vocabulary_map("every student id mapped")
    torch.manual_seed(3)
    student = torch.randn(4, mapping.student_size, requires_grad=True)
    teacher = torch.randn(4, mapping.teacher_size)
    teacher[:, mapping.teacher_ids] += 6.0  # the mapped ids lead every row's top-k
    value = divergence_of(student, cached(teacher, 5), mapping, "exact",
                          LossSettings(divergence=get_divergence(divergence)))
    (grad,) = torch.autograd.grad(value.sum(), student)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
