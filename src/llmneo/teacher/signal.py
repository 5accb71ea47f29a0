"""The teacher-signal interface: where a run's KD targets come from.

A ``TeacherSignal`` is chosen once per run (``pipeline.teacher_signal``) and is everything the trainer knows of
the teacher: ``TokenDistillTrainer.compute_loss`` asks it for the batch's targets (losses/targets.py) and never asks which
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

Each source class also says from which settings a run uses it and builds itself (``chosen``, ``connect``,
``reading_tokenizer``, ``open_cache``, ``loads_teacher``, ``build``): teacher/choice.py asks the registered
classes, in order, and is the one place a run's source is chosen. The sources live in teacher/sources.py; a new
one is one class there (or anywhere, registered with ``choice.register_source``: the tests add a toy one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..evaluation.metrics import HeldOutOptions, evaluate_against_teacher
from ..models.loading import load_reading_tokenizer
from ..losses.targets import SampledTargets, StudentSide, TeacherTargets, TokenTargets


@dataclass
class RunModels:
    """A run's models and tokenizers, as one record."""

    tokenizer: Any  # the student's
    student: torch.nn.Module
    teacher: torch.nn.Module | None = None  # loaded when the source reads a teacher model
    teacher_tokenizer: Any = None  # the teacher's own, when it reads its own rendering of each row
    head: Any = None  # a classification run's ClassHead


@dataclass
class SourceParts:
    """What a source is built from: the run's models, and what the earlier steps of the run opened for it."""

    models: RunModels
    cache: Any = None  # the teacher cache (open_cache)
    connection: Any = None  # what connect returned (a served teacher)
    dataset: Any = None  # the training rows (with row_id)


class TeacherSignal:
    """A source of the teacher's signal. The defaults describe no teacher at all (CE only, the student's own rows):
    a source overrides what it adds."""

    teacher: torch.nn.Module | None = None  # a loaded teacher model (placed by the trainer), if any
    teacher_tokenizer = None  # the teacher's own tokenizer when it reads its own rendering of each row
    kd_vocab_size: int | None = None  # the shared vocabulary the one-tokenizer KD term compares
    loads_teacher: ClassVar[bool] = False  # a run of this source loads the teacher model (teacher/loading.py)
    reads_own_rendering: ClassVar[bool] = False  # the rows carry the teacher's own tokens (--cross_tokenizer)

    # ---- how a run's settings choose and build a source (teacher/choice.py) ----

    @classmethod
    def chosen(cls, config) -> bool:
        """Whether a run with these settings uses this source (the registered sources are asked in order)."""
        return False

    @classmethod
    def connect(cls, config, tokenizer) -> Any:
        """Checks made before any model loads (a server must answer); what they return reaches ``build``."""
        return None

    @classmethod
    def reading_tokenizer(cls, config) -> Any:
        """The teacher's own tokenizer (with its chat template) when this source reads its own rendering of each row
        (``reads_own_rendering``: the data side adds its rows), else None."""
        if not cls.reads_own_rendering:
            return None
        return load_reading_tokenizer(config.model.teacher_model, config.model.trust_remote_code, "teacher",
                                      chat_template=config.model.teacher_chat_template)

    @classmethod
    def open_cache(cls, config, tokenizer, dataset, data: dict) -> Any:
        """The teacher cache this source reads, checked against the run's rows (None: it reads none)."""
        return None

    @classmethod
    def build(cls, config, parts: SourceParts) -> TeacherSignal:
        raise NotImplementedError

    def place(self, placer, device) -> None:
        """Put the loaded teacher where the trainer runs it (``placer``: a model -> the model placed for DDP, ZeRO
        or FSDP2), then ``attach``."""
        self.attach(placer(self.teacher) if self.teacher is not None else None, device)

    def attach(self, teacher: torch.nn.Module | None, device) -> None:
        """Take the teacher as the trainer placed it (DDP, ZeRO, FSDP2) and move own tensors to ``device``."""
        self.teacher = teacher

    def loaded_teachers(self) -> list[torch.nn.Module]:
        """The teacher models this signal runs (the loss implementation must suit each one's head)."""
        return [self.teacher] if self.teacher is not None else []

    def collator(self, padded, tokenizer):
        """The training and evaluation collator, from the student's padded one and its tokenizer."""
        return padded

    def targets(self, inputs: dict, student: StudentSide) -> TeacherTargets:
        """The teacher's side of this batch's loss (none: CE only)."""
        return TokenTargets()

    def sampled_targets(self, inputs: dict, student: StudentSide) -> TeacherTargets:
        """An on-policy ``sampled`` step's targets: the teacher's log-probability of each token the student sampled."""
        return SampledTargets(self.targets(inputs, student))

    def score_only(self, rows: set[int]) -> None:
        """Column routing (several teachers): this source scores only these training rows, so that a source that
        asks for rows ahead asks for these alone."""

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

    @classmethod
    def chosen(cls, config) -> bool:
        return True  # asked last: a run no other source takes has no teacher

    @classmethod
    def build(cls, config, parts: SourceParts) -> TeacherSignal:
        return cls()
