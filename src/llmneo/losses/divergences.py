"""Token-level divergences between the teacher's and the student's next-token distributions.

Every function takes student and teacher logit rows (N, V) and a temperature T, applies softmax(z / T) to both,
works in fp32 and returns one value per row (N,). The T^2 factor is applied by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _log_probs(student_logits, teacher_logits, temperature):
    return (F.log_softmax(student_logits.float() / temperature, dim=-1),
            F.log_softmax(teacher_logits.float() / temperature, dim=-1))


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities; tokens with p = 0 contribute 0 (not 0 * inf = nan). A non-finite
    p (NaN) stays NaN: it must not pass for a perfect match."""
    p = log_p.exp()
    return torch.where(p == 0, 0.0, p * (log_p - log_q)).sum(-1)


def _log_mix(weight: float, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """log(weight * p + (1 - weight) * q), computed stably in log space."""
    stacked = torch.stack([log_p + _log(weight), log_q + _log(1.0 - weight)])
    return torch.logsumexp(stacked, dim=0)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || p_student): mode-covering, the LLM-Neo default."""
    student, teacher = _log_probs(student_logits, teacher_logits, temperature)
    return kl_from_log_probs(teacher, student)


def reverse_kl(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_student || p_teacher): mode-seeking."""
    student, teacher = _log_probs(student_logits, teacher_logits, temperature)
    return kl_from_log_probs(student, teacher)


def generalized_jsd(student_logits, teacher_logits, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """beta * KL(p_t || m) + (1 - beta) * KL(p_s || m) with m = beta * p_t + (1 - beta) * p_s (GKD).

    The end points are defined as the limits the method names: beta = 0 is forward KL, beta = 1 reverse KL.
    """
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature)
    student, teacher = _log_probs(student_logits, teacher_logits, temperature)
    mixture = _log_mix(beta, teacher, student)
    return beta * kl_from_log_probs(teacher, mixture) + (1.0 - beta) * kl_from_log_probs(student, mixture)


def total_variation(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """0.5 * sum |p_t - p_s|."""
    student, teacher = _log_probs(student_logits, teacher_logits, temperature)
    return 0.5 * (teacher.exp() - student.exp()).abs().sum(-1)


def skew_forward_kl(student_logits, teacher_logits, temperature: float = 1.0, skew: float = 0.1) -> torch.Tensor:
    """KL(p_t || skew * p_t + (1 - skew) * p_s) (DistiLLM)."""
    student, teacher = _log_probs(student_logits, teacher_logits, temperature)
    return kl_from_log_probs(teacher, _log_mix(skew, teacher, student))


def skew_reverse_kl(student_logits, teacher_logits, temperature: float = 1.0, skew: float = 0.1) -> torch.Tensor:
    """KL(p_s || skew * p_s + (1 - skew) * p_t) (DistiLLM)."""
    student, teacher = _log_probs(student_logits, teacher_logits, temperature)
    return kl_from_log_probs(student, _log_mix(skew, student, teacher))


def adaptive_kl(student_logits, teacher_logits, temperature: float = 1.0, mu: float = 0.5) -> torch.Tensor:
    """AKL (Wu et al., 2404.02657): g_head * FKL + g_tail * RKL.

    As in the authors' code (``get_ratio``: ``mask = cumsum > mu``, the top-1 token always head), the head is the
    top teacher tokens whose cumulative teacher mass stays at or below ``mu``, plus the most likely token: the token
    whose cumulative mass first exceeds ``mu`` belongs to the tail. g_head and g_tail are the shares of
    sum |p_t - p_s| falling in the head and the tail (computed without gradient, as weights). When the two
    distributions are equal (0/0) both weights are 1/2.
    """
    student, teacher = _log_probs(student_logits, teacher_logits, temperature)
    with torch.no_grad():
        p_teacher, order = teacher.exp().sort(dim=-1, descending=True)
        gap = (p_teacher - student.exp().gather(-1, order)).abs()
        in_head = p_teacher.cumsum(-1) <= mu
        in_head[..., 0] = True
        head_gap, tail_gap = (gap * in_head).sum(-1), (gap * ~in_head).sum(-1)
        total = head_gap + tail_gap
        g_head = torch.where(total > 0, head_gap / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)
    return g_head * kl_from_log_probs(teacher, student) + (1.0 - g_head) * kl_from_log_probs(student, teacher)


DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "tvd": total_variation,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "akl": adaptive_kl,
}


@dataclass(frozen=True)
class Divergence:
    """A divergence with its parameters bound: ``divergence(student_logits, teacher_logits, temperature)``."""

    name: str
    function: Callable  # f(student_logits, teacher_logits, temperature, **parameters) -> (rows,)
    parameters: tuple[tuple[str, float], ...] = ()
    closed_form_gradient: bool = False  # the fused head computes its gradient in place (no autograd)
    liger_beta: float | None = None  # the beta of Liger's JSD loss that equals it; None when there is none

    def __call__(self, student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
        return self.function(student_logits, teacher_logits, temperature, **dict(self.parameters))


def get_divergence(name: str = "forward_kl", jsd_beta: float = 0.5, skew_lambda: float = 0.1,
                   akl_mu: float = 0.5) -> Divergence:
    """The divergence called ``name`` with its parameter bound."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{name}'; expected one of {sorted(DIVERGENCES)}")
    parameters = {"jsd": {"beta": jsd_beta}, "skew_forward_kl": {"skew": skew_lambda},
                  "skew_reverse_kl": {"skew": skew_lambda}, "akl": {"mu": akl_mu}}.get(name, {})
    liger_beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": jsd_beta}.get(name)
    return Divergence(name, DIVERGENCES[name], tuple(parameters.items()), closed_form_gradient=name == "forward_kl",
                      liger_beta=liger_beta)
