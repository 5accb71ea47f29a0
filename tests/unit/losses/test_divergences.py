"""Each divergence against a naive per-row implementation written here: values and gradients (fp32)."""

import math

import pytest
import torch

from conftest import run_flags
from llmneo.config import parse_config
from llmneo.errors import ConfigError
from llmneo.losses.contract import LossSettings
from llmneo.losses.reference import distillation_loss
from llmneo.losses.divergences import DIVERGENCES, get_divergence
from llmneo.pipeline import distill


def probs(row, temperature):
    scaled = [x / temperature for x in row]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=False) if a > 0)


def naive(name, s_row, t_row, temperature, beta=0.5, skew=0.1, mu=0.5):
    """Plain-Python definition of every divergence on one row (used for values)."""
    ps, pt = probs(s_row, temperature), probs(t_row, temperature)
    if name == "forward_kl":
        return kl(pt, ps)
    if name == "reverse_kl":
        return kl(ps, pt)
    if name == "jsd":
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps, strict=False)]
        return beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    if name == "tvd":
        return 0.5 * sum(abs(a - b) for a, b in zip(pt, ps, strict=False))
    if name == "skew_forward_kl":
        return kl(pt, [skew * a + (1 - skew) * b for a, b in zip(pt, ps, strict=False)])
    if name == "skew_reverse_kl":
        return kl(ps, [skew * b + (1 - skew) * a for a, b in zip(pt, ps, strict=False)])
    if name == "akl":
        order = sorted(range(len(pt)), key=lambda i: -pt[i])
        head, mass = [order[0]], pt[order[0]]  # the top-1 token is always head
        for i in order[1:]:  # then every token while the cumulative teacher mass stays <= mu (authors' get_ratio)
            mass += pt[i]
            if mass > mu:
                break
            head.append(i)
        head_gap = sum(abs(pt[i] - ps[i]) for i in head)
        tail_gap = sum(abs(pt[i] - ps[i]) for i in range(len(pt)) if i not in head)
        g_head = head_gap / (head_gap + tail_gap) if head_gap + tail_gap > 0 else 0.5
        return g_head * kl(pt, ps) + (1 - g_head) * kl(ps, pt)
    raise KeyError(name)


def kl_t(p, q):
    return (p * (p.log() - q.log())).sum()


def naive_torch_row(name, ps, pt, beta, skew):
    if name == "forward_kl":
        return kl_t(pt, ps)
    if name == "reverse_kl":
        return kl_t(ps, pt)
    if name == "jsd":
        m = beta * pt + (1 - beta) * ps
        return beta * kl_t(pt, m) + (1 - beta) * kl_t(ps, m)
    if name == "tvd":
        return 0.5 * (pt - ps).abs().sum()
    if name == "skew_forward_kl":
        return kl_t(pt, skew * pt + (1 - skew) * ps)
    if name == "skew_reverse_kl":
        return kl_t(ps, skew * ps + (1 - skew) * pt)
    raise KeyError(name)


def naive_torch(name, student, teacher, temperature, beta=0.5, skew=0.1, mu=0.5):
    """The same definitions with torch ops per row, for gradients (AKL weights are constants, as documented)."""
    out = []
    for s_row, t_row in zip(student, teacher, strict=True):
        ps, pt = torch.softmax(s_row / temperature, -1), torch.softmax(t_row / temperature, -1)
        if name != "akl":
            out.append(naive_torch_row(name, ps, pt, beta, skew))
            continue
        value = naive(name, s_row.tolist(), t_row.tolist(), temperature, mu=mu)
        fkl, rkl = kl_t(pt, ps), kl_t(ps, pt)
        spread = fkl.item() - rkl.item()
        g_head = (value - rkl.item()) / spread if abs(spread) > 1e-9 else 0.5
        out.append(g_head * fkl + (1 - g_head) * rkl)
    return torch.stack(out)


def rows(seed=0, n=5, vocab=9):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=generator) * 2, torch.randn(n, vocab, generator=generator) * 2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_values_match_plain_python(name, temperature):
    student, teacher = rows()
    ours = get_divergence(name, jsd_beta=0.3, skew_lambda=0.2, akl_mu=0.5)(student, teacher, temperature)
    expected = [naive(name, s.tolist(), t.tolist(), temperature, beta=0.3, skew=0.2) for s, t in zip(student, teacher, strict=False)]
    torch.testing.assert_close(ours, torch.tensor(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_gradients_match_autograd_of_naive(name):
    student, teacher = rows(seed=1)
    ours_in, naive_in = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    get_divergence(name, jsd_beta=0.3, skew_lambda=0.2)(ours_in, teacher, 2.0).sum().backward()
    naive_torch(name, naive_in, teacher, 2.0, beta=0.3, skew=0.2).sum().backward()
    torch.testing.assert_close(ours_in.grad, naive_in.grad, atol=1e-5, rtol=1e-4)


def test_jsd_end_points_are_forward_and_reverse_kl():
    student, teacher = rows(seed=2)
    torch.testing.assert_close(get_divergence("jsd", jsd_beta=0.0)(student, teacher), DIVERGENCES["forward_kl"](student, teacher))
    torch.testing.assert_close(get_divergence("jsd", jsd_beta=1.0)(student, teacher), DIVERGENCES["reverse_kl"](student, teacher))


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_zero_when_the_distributions_match(name):
    student, _ = rows(seed=3)
    value = get_divergence(name)(student, student.clone(), 1.0)
    assert torch.isfinite(value).all()
    torch.testing.assert_close(value, torch.zeros_like(value), atol=1e-6, rtol=0)


def test_akl_head_is_the_fewest_tokens_reaching_mu():
    """Teacher mass 0.6 on one token: the head is that token alone, so only its gap weighs the forward KL."""
    teacher = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.1)]])
    student = torch.tensor([[math.log(0.2), math.log(0.3), math.log(0.5)]])
    value = DIVERGENCES["akl"](student, teacher).item()
    head_gap, tail_gap = 0.4, 0.4  # |0.6-0.2| vs |0.3-0.3| + |0.1-0.5|
    g_head = head_gap / (head_gap + tail_gap)
    fkl = kl([0.6, 0.3, 0.1], [0.2, 0.3, 0.5])
    rkl = kl([0.2, 0.3, 0.5], [0.6, 0.3, 0.1])
    assert value == pytest.approx(g_head * fkl + (1 - g_head) * rkl, rel=1e-5)


def test_akl_token_crossing_mu_is_tail_as_in_the_authors_code():
    """Teacher [0.4, 0.3, 0.2, 0.1], mu = 0.5: the cumulative mass is 0.4, 0.7, ... so the second token, whose
    cumulative mass first exceeds mu, is tail (get_ratio: mask = cumsum > mu); only the top-1 token is head.
    Counting it as head (the fewest tokens reaching mu) would give g_head = 0.4 / 0.8 instead of 0.3 / 0.8."""
    p_teacher, p_student = [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.2, 0.5]
    teacher = torch.tensor([[math.log(p) for p in p_teacher]])
    student = torch.tensor([[math.log(p) for p in p_student]])
    value = get_divergence("akl", akl_mu=0.5)(student, teacher).item()
    head_gap, tail_gap = 0.3, 0.1 + 0.0 + 0.4  # |0.4-0.1| vs |0.3-0.2| + |0.2-0.2| + |0.1-0.5|
    g_head = head_gap / (head_gap + tail_gap)
    assert g_head == pytest.approx(0.375)
    fkl, rkl = kl(p_teacher, p_student), kl(p_student, p_teacher)
    assert value == pytest.approx(g_head * fkl + (1 - g_head) * rkl, rel=1e-5)
    assert value != pytest.approx(0.5 * fkl + 0.5 * rkl, rel=1e-3)


def test_akl_top1_token_is_head_even_above_mu():
    """Teacher mass 0.8 on the top token, mu = 0.5: its cumulative mass exceeds mu, yet it is the head."""
    p_teacher, p_student = [0.8, 0.15, 0.05], [0.5, 0.25, 0.25]
    value = get_divergence("akl", akl_mu=0.5)(torch.tensor([[math.log(p) for p in p_student]]),
                                              torch.tensor([[math.log(p) for p in p_teacher]])).item()
    g_head = 0.3 / (0.3 + 0.1 + 0.2)
    expected = g_head * kl(p_teacher, p_student) + (1 - g_head) * kl(p_student, p_teacher)
    assert value == pytest.approx(expected, rel=1e-5)


def test_loss_uses_the_chosen_divergence_on_shifted_answer_rows():
    student, teacher = rows(seed=4, n=6)
    student, teacher = student.view(1, 6, 9), teacher.view(1, 6, 9)
    labels = torch.tensor([[-100, -100, 3, 4, -100, 5]])  # predicted from positions 1, 2, 4
    parts = distillation_loss(student, labels, teacher,
                              settings=LossSettings(alpha=0.0, temperature=2.0, divergence=get_divergence("reverse_kl")))
    expected = sum(naive("reverse_kl", student[0, t].tolist(), teacher[0, t].tolist(), 2.0) for t in (1, 2, 4)) * 4 / 3
    assert parts.loss.item() == pytest.approx(expected, rel=1e-5)


def test_divergence_options_are_validated():
    base = ["--student_model", "s", "--teacher_model", "t", "--dataset", "d.jsonl"]
    with pytest.raises(ConfigError, match=r"jsd_beta must be in \[0, 1\], got 1.5"):
        parse_config(base + ["--divergence", "jsd", "--jsd_beta", "1.5"])
    with pytest.raises(ConfigError, match=r"akl_mu must be in \(0, 1\), got 0.0"):
        parse_config(base + ["--akl_mu", "0"])
    with pytest.raises(SystemExit):
        parse_config(base + ["--divergence", "wasserstein"])


@pytest.mark.e2e
def test_training_with_another_divergence(models_dir, train_file, tmp_path):
    import json

    summary = distill(parse_config(run_flags(models_dir, train_file, tmp_path, divergence="akl")))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary.steps == 3 and all(entry["kd_loss"] > 0 for entry in logged if "kd_loss" in entry)


def test_config_choices_name_every_divergence():
    """config.py cannot import the losses (it sits below them), so its choices are checked here."""
    import typing

    from llmneo.config import DistillArguments

    choices = typing.get_args(typing.get_type_hints(DistillArguments)["divergence"])
    assert set(choices) == set(DIVERGENCES)
