"""The teacher-signal interface: where a run's KD targets come from.

A ``TeacherSignal`` is chosen once per run (``pipeline.teacher_signal``) and is everything the trainer knows of
the teacher: ``NeoTrainer.compute_loss`` asks it for the batch's targets (losses/targets.py) and never asks which
kind it has. A source supplies

- what the data side needs: ``teacher_tokenizer`` when the teacher reads its own rendering of each row, and the
  ``collator`` that adds the teacher's rows to a batch;
- ``targets(inputs, student)``: one ``TeacherTargets`` for the batch;
- ``diagnostics``: what it logs before the first step (e.g. coverage across tokenizers);
- ``evaluate``: the held-out metrics it can compute;
- ``planned``: on-policy runs tell it which collated rows a step trains on as they are and which it replaces by
  the student's answers, so that it asks nothing for rows no step reads;
- ``log_figures`` and ``at_checkpoint``: what it adds to each log line, and checks before a checkpoint counts;
- ``identity``: what it adds to the run identity, so that a resume against another teacher signal is refused.

The sources live in teacher/sources.py; a new one is one class there (or anywhere: the tests add a toy one).
"""

from __future__ import annotations

import torch

from ..evaluation.metrics import HeldOutOptions, evaluate_against_teacher
from ..losses.targets import SampledTargets, StudentSide, TeacherTargets, TokenTargets


class TeacherSignal:
    """A source of the teacher's signal. The defaults describe no teacher at all (CE only, the student's own rows):
    a source overrides what it adds."""

    teacher: torch.nn.Module | None = None  # a loaded teacher model (placed by the trainer), if any
    teacher_tokenizer = None  # the teacher's own tokenizer when it reads its own rendering of each row
    kd_vocab_size: int | None = None  # the shared vocabulary the one-tokenizer KD term compares

    def attach(self, teacher: torch.nn.Module | None, device) -> None:
        """Take the teacher as the trainer placed it (DDP, ZeRO, FSDP2) and move own tensors to ``device``."""
        self.teacher = teacher

    def collator(self, padded, tokenizer):
        """The training and evaluation collator, from the student's padded one and its tokenizer."""
        return padded

    def targets(self, inputs: dict, student: StudentSide) -> TeacherTargets:
        """The teacher's side of this batch's loss (none: CE only)."""
        return TokenTargets()

    def sampled_targets(self, inputs: dict, student: StudentSide) -> TeacherTargets:
        """An on-policy ``sampled`` step's targets: the teacher's log-probability of each token the student sampled."""
        return SampledTargets(self.targets(inputs, student))

    def planned(self, rows: list[int], on_policy: bool, next_on_policy: bool) -> None:
        """An on-policy run's step has its micro-batches: ``rows`` (their row ids) are trained on as they are unless
        ``on_policy`` (then the student's answers replace them); rows collated ahead belong to the next step,
        which does not read them either when ``next_on_policy`` (it is on-policy, or there is none)."""

    def diagnostics(self, trainer, dataset, report) -> dict:
        """Figures logged (as ``train_<name>``) before the first step and kept in the run's final metrics."""
        return {}

    def evaluate(self, trainer, dataset) -> dict:
        """Held-out metrics: the student's, with its agreement and KL against a teacher on its own tokens."""
        options = HeldOutOptions(batch_size=trainer.args.per_device_eval_batch_size,
                                 kd_vocab_size=trainer.loss_settings.kd_vocab_size,
                                 chunk_size=trainer.loss_settings.chunk_size, byte_lengths=trainer.byte_lengths)
        return evaluate_against_teacher(trainer.model, dataset, trainer.eval_collator, self.scoring_teacher(), options)

    def scoring_teacher(self) -> torch.nn.Module | None:
        """The model that scores the student's own tokens in evaluation (None: student-only metrics)."""
        return None

    def log_figures(self, steps: int) -> dict:
        """Figures added to each training log line, over the ``steps`` optimizer steps since the last one."""
        return {}

    def at_checkpoint(self) -> None:
        """Checked before a checkpoint is marked complete (e.g. that a served teacher is still the run's)."""

    def close(self) -> None:
        """Release what the source holds (threads, connections) at the end of the run."""

    def identity(self) -> dict:
        """What identifies this signal beyond the run's options (empty: the options say it all)."""
        return {}


class NoTeacher(TeacherSignal):
    """CE only (sft, lora): the interface's defaults, named."""
