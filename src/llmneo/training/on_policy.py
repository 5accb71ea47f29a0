"""On-policy steps: which optimizer steps train on the student's own answers, and their loss.

With ``--on_policy_fraction L``, optimizer step k (from 0) is on-policy iff floor((k+1)·L) − floor(k·L) = 1: the
on-policy steps are spread evenly and deterministically (L = 0.5 alternates, starting off-policy). On such a step
every micro-batch is replaced by the student's answers to its prompts (rollouts.py) before the step's answer
tokens are counted, so the loss is normalised by the generated tokens of the whole step, across accumulation and
ranks. The loss is the KD term alone — there are no labels, the answer is the student's own:

- ``full``: T²·D(teacher ‖ student) with the run's divergence at every generated token, through the run's loss
  implementation (the fused head: no B·T·V logits);
- ``sampled``: the per-token reverse-KL estimator on the sampled tokens (losses/sampled.py), T = 1.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import torch

from ..losses.contract import LossParts, LossSettings, answer_mask
from ..losses.sampled import answer_log_probs
from ..losses.targets import StudentSide, TeacherTargets
from ..rollout_engines import choose_engine
from ..rollouts import ROLLOUT_LOG_PROBS, Rollouts, RolloutSettings, RolloutStats
from ..teacher.signal import TeacherSignal


def is_on_policy_step(step: int, fraction: float) -> bool:
    share = Fraction(fraction).limit_denominator(10**6)  # 0.29 * 100 must be 29 (not 28.999...), 1/3 * 3 one
    return (share * (step + 1)).__floor__() - (share * step).__floor__() == 1


class OnPolicyLoss:
    """How an on-policy step's loss reads the teacher: the KD term alone, from the targets ``targets`` gives."""

    def settings(self, settings: LossSettings) -> LossSettings:
        return dataclasses.replace(settings, alpha=0.0)  # the KD term alone

    def targets(self, signal: TeacherSignal, inputs: dict, student: StudentSide) -> TeacherTargets:
        raise NotImplementedError


class FullLoss(OnPolicyLoss):
    """T²·D at every generated token, from the teacher's whole distribution (the run's divergence)."""

    def targets(self, signal: TeacherSignal, inputs: dict, student: StudentSide) -> TeacherTargets:
        return signal.targets(inputs, student)


class SampledLoss(OnPolicyLoss):
    """The per-token reverse-KL estimator on the sampled tokens."""

    def targets(self, signal: TeacherSignal, inputs: dict, student: StudentSide) -> TeacherTargets:
        return signal.sampled_targets(inputs, student)


LOSSES = {"full": FullLoss, "sampled": SampledLoss}


class OnPolicy:
    """The run's on-policy schedule, rollouts and loss (``--on_policy_*``, ``--rollout_*``)."""

    def __init__(self, fraction: float, loss: OnPolicyLoss, rollouts: Rollouts):
        self.fraction, self.loss, self.rollouts = fraction, loss, rollouts
        self.steps = 0  # on-policy optimizer steps since the last log

    @classmethod
    def from_args(cls, args, tokenizer, model) -> OnPolicy | None:
        """The run's on-policy steps, their engine chosen and checked against ``model`` (the student)."""
        if args.on_policy_fraction == 0:
            return None
        engine = choose_engine(args, tokenizer)
        engine.start(model)
        return cls(args.on_policy_fraction, LOSSES[args.on_policy_loss](),
                   Rollouts(RolloutSettings.from_args(args), tokenizer, engine))

    def is_step(self, step: int) -> bool:
        return is_on_policy_step(step, self.fraction)

    def batches(self, model, batches: list[dict], step: int) -> list[dict]:
        self.steps += 1
        self.rollouts.engine.before_step(model, step)
        return [self.rollouts.batch(model, batch, step) for batch in batches]

    def parts(self, signal: TeacherSignal, inputs: dict, student: StudentSide, settings: LossSettings,
              num_items) -> LossParts:
        self.observe_gap(inputs, student, settings.chunk_size)
        parts = self.loss.targets(signal, inputs, student).loss(student, inputs["labels"], self.loss.settings(settings),
                                                                num_items)
        return dataclasses.replace(parts, ce=parts.ce * 0)  # no CE term on the student's own answers

    @torch.no_grad()
    def observe_gap(self, inputs: dict, student: StudentSide, chunk_size: int) -> None:
        """rollout_logprob_gap: the engine's log-probability of each sampled token against the trainer's own, from
        the student's outputs of this very forward (a stale adapter, another base or a numeric mismatch shows)."""
        labels = inputs["labels"]
        mask = answer_mask(labels)
        if not mask.any():
            return
        ours = answer_log_probs(student.rows.detach(), labels, student.weight, chunk_size)
        theirs = inputs[ROLLOUT_LOG_PROBS][:, 1:][mask].to(ours.device)
        self.rollouts.stats.observe_gap((ours.float() - theirs).abs().max().item())

    def figures(self, steps: int) -> dict:
        """The log line's on-policy figures over ``steps`` optimizer steps; then counting starts again."""
        figures = {"on_policy": round(self.steps / steps, 4), **self.rollouts.stats.figures(),
                   **self.rollouts.engine.figures()}
        self.steps = 0
        self.rollouts.stats = RolloutStats()
        return figures
