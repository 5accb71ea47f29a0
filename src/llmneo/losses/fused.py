"""The fused chunked head: final hidden states -> CE + divergence and their gradients, without B·T·V logits.

The reference path (reference.py) lets the model build ``lm_head(hidden)`` for every position of the batch, for both
models, and differentiates the loss through it. Here only the answer positions are gathered (contract.py's shift:
position t predicts label t + 1), and they are walked ``chunk_size`` rows at a time: a chunk's logits are built for both
models, its loss terms and the gradient w.r.t. those logits are computed at once, and the gradient is pushed
through the head (to the hidden states, and to the head weight only when it is trainable) before the next chunk.
The backward pass then only scales the stored gradients.

The default divergence (forward KL) and CE alone have hand-derived gradients computed in place, so a chunk needs
about two fp32 chunk x V buffers; the other divergences differentiate the reference expression with autograd,
an eighth of the chunk's rows at a time (about two more buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .contract import DEFAULT_LOSS_SETTINGS, LossParts, LossSettings, answer_mask, answer_rows, answer_targets
from .divergences import kl_from_log_probs
from .topk import LogitRows, TopKRows, kd_per_row

# Row reductions over a chunk run on eighth-chunk blocks so that their temporaries stay small.
REDUCTION_BLOCKS = 8


def _blocks(rows: int):
    step = max(1, -(-rows // REDUCTION_BLOCKS))
    return [slice(start, start + step) for start in range(0, rows, step)]


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0])
    for block in _blocks(x.shape[0]):
        out[block] = torch.logsumexp(x[block], dim=-1)
    return out


def _target_logits(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return z.gather(1, targets[:, None]).squeeze(1)


def _ce_only(z, targets):
    """CE summed over rows, and z overwritten with dCE/dz = softmax(z) - onehot."""
    lse = _logsumexp(z)
    ce = (lse - _target_logits(z, targets)).sum()
    z.sub_(lse[:, None]).exp_()
    z[torch.arange(z.shape[0], device=z.device), targets] -= 1.0
    return ce, torch.zeros_like(ce), z


def _ce_forward_kl(z, teacher, targets, settings: LossSettings):
    """CE and forward KL summed over rows; z overwritten with d(alpha CE + (1-alpha) T^2 KL)/dz.

    The gradient of T^2 KL(p_t || p_s) w.r.t. z is T (p_s - p_t); of CE it is softmax(z) - onehot. ``teacher``
    (rows x kd_vocab, fp32, owned) is overwritten too: only these two buffers are alive.
    """
    alpha, temperature, vocab = settings.alpha, settings.temperature, teacher.shape[1]
    lse = _logsumexp(z)
    ce = (lse - _target_logits(z, targets)).sum()
    scaled = temperature != 1.0  # T = 1 (the default) skips four passes over the chunk
    if scaled:
        teacher.div_(temperature)
    teacher.sub_(_logsumexp(teacher)[:, None])  # log p_t
    student = z[:, :vocab]
    if scaled:
        student.div_(temperature)
    lse_t = _logsumexp(student)
    student.sub_(lse_t[:, None])  # log p_s at temperature T
    kd = torch.cat([kl_from_log_probs(teacher[block], student[block]) for block in _blocks(z.shape[0])]).sum()
    teacher.exp_()
    for block in _blocks(z.shape[0]):
        teacher[block].sub_(student[block].exp())
    teacher.mul_(-(1.0 - alpha) * temperature)  # (1 - alpha) T (p_s - p_t)
    if scaled:
        student.mul_(temperature)
    student.add_((temperature * lse_t - lse)[:, None])  # back to z - lse
    z[:, vocab:].sub_(lse[:, None])
    z.exp_().mul_(alpha)
    student.add_(teacher)
    z[torch.arange(z.shape[0], device=z.device), targets] -= alpha
    return ce, kd, z


def _ce_divergence_autograd(z, teacher, targets, settings: LossSettings):
    """Any divergence: the reference expression differentiated with autograd, one row block at a time so its
    temporaries stay a fraction of the chunk. z is overwritten with the gradient, block by block."""
    alpha, temperature, vocab = settings.alpha, settings.temperature, settings.kd_vocab_size or z.shape[1]
    ce_sum = kd_sum = z.new_zeros(())
    for block in _blocks(z.shape[0]):
        rows = z[block].detach().requires_grad_(True)
        with torch.enable_grad():
            ce = F.cross_entropy(rows, targets[block], reduction="sum")
            kd = kd_per_row(rows[:, :vocab], teacher[block], settings.divergence, temperature, settings.tail_mode).sum()
            (grad,) = torch.autograd.grad(alpha * ce + (1.0 - alpha) * temperature**2 * kd, rows)
        z[block] = grad
        ce_sum, kd_sum = ce_sum + ce.detach(), kd_sum + kd.detach()
    return ce_sum, kd_sum, z


def _chunk_terms(z, teacher: LogitRows | TopKRows | None, targets, settings: LossSettings):
    if teacher is None:
        return _ce_only(z, targets)
    if settings.divergence.closed_form_gradient and teacher.full_distribution:
        return _ce_forward_kl(z, teacher.logits, targets, settings)
    return _ce_divergence_autograd(z, teacher, targets, settings)


# The teacher at the answer rows, chunk by chunk: each gives a chunk's rows over the shared vocabulary (logits as an
# fp32 tensor the caller may overwrite, or cached top-k rows).

@dataclass
class _HiddenChunks:
    hidden: torch.Tensor  # (N, H) answer rows
    weight: torch.Tensor  # the teacher's head

    def chunk(self, rows: slice, vocab: int) -> LogitRows:
        return LogitRows(F.linear(self.hidden[rows], self.weight[:vocab]).float())


@dataclass
class _LogitChunks:
    logits: torch.Tensor  # (N, V) answer rows

    def chunk(self, rows: slice, vocab: int) -> LogitRows:
        return LogitRows(self.logits[rows, :vocab].to(torch.float32, copy=True))


@dataclass
class _TopKChunks:
    topk: TopKRows  # answer order

    def chunk(self, rows: slice, vocab: int) -> TopKRows:
        return self.topk[rows]


def _teacher_chunks(mask, teacher_hidden, teacher_weight, teacher_logits, teacher_topk):
    """The chunk source of whichever teacher form the call was given (none: CE only)."""
    if teacher_hidden is not None:
        if teacher_weight is None:
            raise ValueError("teacher_hidden needs teacher_weight")
        return _HiddenChunks(answer_rows(teacher_hidden, mask), teacher_weight)
    if teacher_logits is not None:
        return _LogitChunks(answer_rows(teacher_logits, mask))
    return _TopKChunks(teacher_topk) if teacher_topk is not None else None


@dataclass
class _Gradients:
    """Where a chunk's gradients go: d loss / d hidden rows (written) and d loss / d head weight (added to)."""

    scale: float | torch.Tensor  # 1 / num_items
    hidden: torch.Tensor
    weight: torch.Tensor | None


@dataclass
class _AnswerRows:
    """The call's answer rows: the student's hidden states and head, the teacher's chunk source and the targets."""

    hidden: torch.Tensor
    weight: torch.Tensor
    teacher: _HiddenChunks | _LogitChunks | _TopKChunks | None
    targets: torch.Tensor


def _chunk_step(rows: slice, answers: _AnswerRows, settings: LossSettings, grads: _Gradients | None):
    """One chunk: its loss sums, with its gradients written into ``grads`` (None: values only).

    A function of its own so that the chunk's buffers are freed before the next chunk allocates its own.
    """
    hidden, weight, teacher = answers.hidden, answers.weight, answers.teacher
    vocab = settings.kd_vocab_size or weight.shape[0]
    z = F.linear(hidden[rows], weight).float()
    teacher_chunk = teacher.chunk(rows, vocab) if teacher is not None else None
    ce, kd, grad_z = _chunk_terms(z, teacher_chunk, answers.targets[rows], settings)
    del z, teacher_chunk
    if grads is None:  # evaluation: values only
        return ce, kd
    grad_z = grad_z.mul_(grads.scale).to(weight.dtype)
    grads.hidden[rows] = grad_z @ weight
    if grads.weight is not None:
        grads.weight.addmm_(grad_z.T, hidden[rows].to(weight.dtype))
    return ce, kd


class _FusedHeadLoss(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward scales them by the incoming grad."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher, targets, num_items, settings: LossSettings):
        scale = 1.0 / num_items
        grad_hidden = torch.empty_like(hidden) if any(ctx.needs_input_grad[:2]) else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grads = _Gradients(scale, grad_hidden, grad_weight) if grad_hidden is not None else None
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        kd_sum = torch.zeros_like(ce_sum)
        answers = _AnswerRows(hidden, weight, teacher, targets)
        for start in range(0, hidden.shape[0], settings.chunk_size):
            rows = slice(start, start + settings.chunk_size)
            ce, kd = _chunk_step(rows, answers, settings, grads)
            ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
        ctx.save_for_backward(grad_hidden, grad_weight)
        has_teacher = teacher is not None
        ce, kd = ce_sum * scale, kd_sum * settings.temperature**2 * scale
        loss = settings.mix(ce, kd, has_teacher).clone()  # a tensor of its own: ce and kd carry no gradient
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)  # only called when grads were computed
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def fused_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    *,
    settings: LossSettings = DEFAULT_LOSS_SETTINGS,
    num_items: int | torch.Tensor | None = None,
    teacher_topk: TopKRows | None = None,
) -> LossParts:
    """The loss of reference.distillation_loss from (B, T, H) final hidden states and the lm_head weights.

    The teacher side is its final hidden states with its head weight, its logits (B, T, V), cached top-k rows in
    answer order (``teacher_topk``), or nothing for CE only.
    """
    mask = answer_mask(labels)
    teacher = _teacher_chunks(mask, teacher_hidden, teacher_weight, teacher_logits, teacher_topk)
    if num_items is None:
        num_items = mask.sum()
    num_items = torch.as_tensor(num_items, dtype=torch.float32, device=student_hidden.device)
    loss, ce, kd = _FusedHeadLoss.apply(answer_rows(student_hidden, mask), student_weight, teacher,
                                        answer_targets(labels, mask), num_items, settings)
    return LossParts(loss=loss, ce=ce, kd=kd)
