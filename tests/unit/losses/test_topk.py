"""Top-k cached rows at k < V: the KD term against KL written out by hand over the k + 1 buckets (bucket mode) and
over the k tokens renormalised (renormalize mode), through the reference and the fused losses."""

import math

import pytest
import torch

from llmneo.losses.divergences import get_divergence
from llmneo.losses.topk import TopKRows, kd_per_row

K, VOCAB = 3, 7


def softmax(row, temperature=1.0):
    top = max(x / temperature for x in row)
    exps = [math.exp(x / temperature - top) for x in row]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def cached(teacher_logits):
    """What cache-teacher stores: the top-k ids, their log-probabilities at T = 1, the log of the rest."""
    log_probs = torch.log_softmax(teacher_logits.double(), -1)
    top = log_probs.topk(K, dim=-1)
    log_tail = torch.log1p(-top.values.exp().sum(-1))
    return TopKRows(top.indices, top.values.float(), log_tail.float())


def bucket_kl_by_hand(student_row, teacher_row, ids, temperature):
    """KL(teacher buckets || student buckets): the k cached tokens plus one bucket holding the rest. The student's
    buckets are its tempered probabilities; the teacher's are softmax([log p_k, log tail] / T) (the tail tempered as
    one token, as documented)."""
    p_teacher = softmax(teacher_row)
    kept = [p_teacher[i] for i in ids]
    teacher_buckets = softmax([math.log(p) for p in kept] + [math.log(1 - sum(kept))], temperature)
    p_student = softmax(student_row, temperature)
    student_kept = [p_student[i] for i in ids]
    return kl(teacher_buckets, student_kept + [1 - sum(student_kept)])


def renormalized_kl_by_hand(student_row, teacher_row, ids, temperature):
    p_teacher = softmax(teacher_row)
    teacher_kept = softmax([math.log(p_teacher[i]) for i in ids], temperature)
    student_kept = softmax([student_row[i] for i in ids], temperature)
    return kl(teacher_kept, student_kept)


def rows(seed=0, n=5):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, VOCAB, generator=generator) * 2, torch.randn(n, VOCAB, generator=generator) * 2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail_mode, by_hand", [("bucket", bucket_kl_by_hand), ("renormalize", renormalized_kl_by_hand)])
def test_topk_kd_per_row_matches_kl_written_out(temperature, tail_mode, by_hand):
    student, teacher = rows()
    topk = cached(teacher)
    ours = kd_per_row(student, topk, get_divergence("forward_kl"), temperature, tail_mode)
    expected = [by_hand(s.tolist(), t.tolist(), ids.tolist(), temperature)
                for s, t, ids in zip(student, teacher, topk.token_ids, strict=True)]
    torch.testing.assert_close(ours, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_bucket_and_renormalize_differ_below_full_vocabulary():
    """The two modes are different quantities at k < V, so a silent switch between them shows."""
    student, teacher = rows(seed=1)
    topk = cached(teacher)
    bucket = kd_per_row(student, topk, get_divergence("forward_kl"), 1.0, "bucket")
    renormalized = kd_per_row(student, topk, get_divergence("forward_kl"), 1.0, "renormalize")
    assert (bucket - renormalized).abs().max() > 1e-2


@pytest.mark.parametrize("tail_mode, by_hand", [("bucket", bucket_kl_by_hand), ("renormalize", renormalized_kl_by_hand)])
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_losses_with_cached_rows_match_kl_written_out(impl, tail_mode, by_hand):
    """A batch of one row whose positions 0..4 predict answer tokens 1..5: the KD term from the cache, through the
    loss the trainer calls, equals the hand-written bucket KL averaged over the answer tokens, times T^2."""
    from llmneo.losses.contract import LossSettings
    from llmneo.losses.fused import fused_distillation_loss
    from llmneo.losses.reference import distillation_loss

    temperature = 2.0
    student, teacher = rows(seed=2, n=6)
    labels = torch.tensor([[-100, 1, 2, 3, 4, 5]])
    topk = cached(teacher[:5])
    settings = LossSettings(alpha=0.0, temperature=temperature, tail_mode=tail_mode, chunk_size=2)
    if impl == "reference":
        parts = distillation_loss(student[None], labels, teacher_topk=topk, settings=settings)
    else:  # the identity head: hidden states are the logits
        parts = fused_distillation_loss(student[None], torch.eye(VOCAB), labels, teacher_topk=topk, settings=settings)
    expected = sum(by_hand(student[t].tolist(), teacher[t].tolist(), topk.token_ids[t].tolist(), temperature)
                   for t in range(5)) / 5 * temperature**2
    assert float(parts.kd) == pytest.approx(expected, rel=1e-5)
