"""The run's trainer, from its settings, models, teacher source and rows: the collators the source and packing
ask for, the metrics log, and the trainer of the task (TokenDistillTrainer or ClassifierTrainer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.collators import make_collator
from ..data.packing import PackingCollator
from ..runtime.layout import METRICS_FILE
from ..teacher.signal import RunModels, TeacherSignal
from .classifier import ClassifierTrainer
from .metrics_log import MetricsJsonlCallback
from .token_level import TokenDistillTrainer


@dataclass
class TrainerExtras:
    """What a run adds to its trainer beyond the defaults."""

    callbacks: tuple = ()  # further transformers TrainerCallbacks
    checkpoint_files: dict[str, bytes] | None = field(default=None)  # written into every checkpoint


def build_trainer(config, models: RunModels, signal: TeacherSignal, dataset, eval_dataset=None,
                  extras: TrainerExtras | None = None) -> TokenDistillTrainer | ClassifierTrainer:
    """The run's trainer; it reads the loss settings from ``config.training`` (NeoTrainingArguments)."""
    tokenizer, extras = models.tokenizer, extras or TrainerExtras()
    padded = signal.collator(make_collator(tokenizer, config.data.task), tokenizer)
    packing = PackingCollator(config.model.attn_implementation) if config.data.packing else None
    metrics = MetricsJsonlCallback(str(Path(config.training.output_dir) / METRICS_FILE))
    common = {"model": models.student, "args": config.training, "train_dataset": dataset,
              "eval_dataset": eval_dataset, "data_collator": packing or padded, "eval_collator": padded,
              "processing_class": tokenizer, "checkpoint_files": extras.checkpoint_files,
              "callbacks": [metrics, *extras.callbacks]}
    if config.data.task == "classification":
        return ClassifierTrainer(**common, teacher=signal.teacher)
    return TokenDistillTrainer(**common, signal=signal)
