"""One distillation run end to end, read top to bottom in ``train_and_write``: config -> data -> models and the
teacher source (chosen once, teacher/choice.py) -> trainer -> artifacts. Each step is a call into the module that
owns it; this module only orchestrates.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import set_seed

from .adapters.lora import PEFT_TASK_TYPES, lora_config
from .adapters.store import save_initial_adapter
from .artifacts import RunOutcome, collect_final_metrics, write_artifacts
from .data.loading import DataReport, TeacherSide, build_datasets
from .data.routing import row_routes
from .errors import ConfigError, DiskFullError
from .evaluation.before_after import compare_with_before, measure_before
from .evaluation.classification import class_fidelity_kl
from .evaluation.metrics import teacher_fidelity_kl
from .methods import METHODS
from .models.class_head import ClassHead
from .models.identity import data_fingerprint, read_models, student_identity
from .models.loading import check_quantization, is_quantized, load_student_tokenizer
from .run_lifecycle import (checkpoint_files, claim_run_dir, failure_marked, lock_run_dir, prepare_run_dir,
                            saves_adapter)
from .runtime.identity import run_identity
from .runtime.planner import plan_micro_batch
from .runtime.processes import check_processes
from .teacher.choice import (connect_teacher, load_models, open_run_cache, reading_teacher_tokenizer,
                             teacher_signal)
from .teacher.loading import load_teacher
from .teacher.signal import RunModels, TeacherSignal
from .training.failures import disk_full_message, train_or_explain
from .training.setup import TrainerExtras, build_trainer

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_dir: Path
    weights_dir: Path
    steps: int
    final_metrics: dict
    data_report: DataReport
    config: object  # the RunConfig the run used
    trainable_parameters: int = 0
    trained_answer_tokens: int = 0  # answer tokens (classification: texts) of every micro-batch trained on


@dataclass
class RunData:
    """The run's rows: training rows (with row_id), held-out rows, what happened to them, their fingerprint."""

    train: object
    held_out: object
    report: DataReport
    fingerprint: dict


@dataclass
class RunStart:
    """What the prepared run directory hands to training."""

    resume: str | None  # the checkpoint resumed from
    base: dict | None  # the identity of the adapter's frozen base
    extras: TrainerExtras


def distill(config, callbacks=()) -> RunSummary:
    """Train one method as configured and write the run directory, which this process holds locked throughout."""
    check_before_loading(config)
    with lock_run_dir(config):
        try:
            return train_and_write(config, callbacks)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            raise DiskFullError(disk_full_message(error, config.training.output_dir)) from None


def train_and_write(config, callbacks=()) -> RunSummary:
    claim_run_dir(config)
    set_seed(config.training.seed)
    tokenizer = load_student_tokenizer(config.model, config.data.task)
    connection = connect_teacher(config, tokenizer)  # before any model loads: a served teacher must answer
    teacher_tokenizer = reading_teacher_tokenizer(config)
    data, cache = load_data(config, tokenizer, teacher_tokenizer)
    base = student_identity(config) if METHODS[config.training.method].uses_adapter else None
    head = class_head(config, tokenizer, data.report)
    models = load_models(config, tokenizer, head, teacher_tokenizer)
    signal = teacher_signal(config, models, cache, data.train, connection)
    identity = run_identity(config.resolved(), data.fingerprint, signal.identity(),
                            read_models(config, base, models.teacher))
    start = RunStart(prepare_run_dir(config, identity, data.report.held_out), base,
                     TrainerExtras(tuple(callbacks), checkpoint_files(config, identity, base)))
    with failure_marked(config):
        return train(config, models, signal, data, start)


def load_data(config, tokenizer, teacher_tokenizer) -> tuple[RunData, object]:
    """The run's rows (across tokenizers with the teacher's own; on-policy across tokenizers also each row's
    prompt messages) and the teacher cache the source reads, checked against them."""
    keep_prompts = teacher_tokenizer is not None and config.training.on_policy_fraction > 0
    dataset, held_out, report = build_datasets(config.data, tokenizer, config.training.seed,
                                               TeacherSide(teacher_tokenizer, keep_prompts, row_routes(config)))
    check_on_policy_rows(config, report)
    log_data(report, held_out)
    fingerprint = data_fingerprint(dataset, config.data.dataset)
    cache = open_run_cache(config, tokenizer, dataset, fingerprint)
    dataset = dataset.add_column("row_id", list(range(len(dataset))))  # names rows in messages; keys the cache
    return RunData(dataset, held_out, report, fingerprint), cache


def train(config, models: RunModels, signal: TeacherSignal, data: RunData, start: RunStart) -> RunSummary:
    """The prepared run: trainer, diagnostics and the before figures, training, then the artifacts."""
    resume = start.resume
    initial_adapter = save_initial_adapter(models.student, Path(config.training.output_dir)) \
        if saves_adapter(config) else None
    trainer = build_trainer(config, models, signal, data.train, data.held_out, start.extras)
    if config.training.auto_micro_batch:
        plan_micro_batch(trainer, data.train, config.training.auto_micro_batch_budget_gib)
    quantized_teacher = models.teacher is not None and is_quantized(models.teacher)
    fidelity = log_teacher_fidelity(config, trainer, models, signal.kd_vocab_size) if quantized_teacher else None
    diagnostics = log_diagnostics(trainer, signal, data)
    before = measure_before(trainer, config, models.tokenizer, data.held_out, resume, signal.teacher_tokenizer)
    try:
        result = train_or_explain(trainer, config, resume)
    finally:
        signal.close()
    final_metrics = {**collect_final_metrics(trainer, result, data.report, data.held_out is not None, fidelity),
                     **diagnostics}
    outcome = RunOutcome(data.report, final_metrics, *compare_with_before(trainer, models.tokenizer, before,
                                                                           final_metrics))
    weights_dir = write_artifacts(trainer, config, models.tokenizer, outcome, initial_adapter, start.base)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return RunSummary(Path(config.training.output_dir), weights_dir, trainer.state.global_step, final_metrics,
                      data.report, config, trainable, trainer.items_seen())


def check_before_loading(config) -> None:
    """Settings that can only be judged against this machine or PEFT fail here, before data and models load."""
    check_processes(config.training.world_size)
    check_quantization(config.model)
    if METHODS[config.training.method].uses_adapter:
        lora_config(config.adapter, PEFT_TASK_TYPES[config.data.task])


def check_on_policy_rows(config, report: DataReport) -> None:
    """On-policy steps answer each row's prompt: plain text rows have none (every token is trained on), and
    prompt-only rows have no answer of their own for the other steps."""
    if report.data_format == "prompt" and config.training.on_policy_fraction < 1:
        raise ConfigError(f"{config.data.dataset} has prompt-only rows: there is no answer to learn from but the "
                          f"student's own; set on_policy_fraction 1 (now {config.training.on_policy_fraction:g})")
    if config.training.on_policy_fraction > 0 and report.data_format == "text":
        raise ConfigError(f"on_policy_fraction {config.training.on_policy_fraction:g}: {config.data.dataset} has "
                          "plain 'text' rows, with no prompt for the student to answer; on-policy steps need rows "
                          "with a prompt (messages, conversations, or prompt and completion)")


def log_data(report: DataReport, held_out) -> None:
    logger.info("data: %d rows used, %d skipped, %d answer tokens%s", report.rows_used, len(report.skipped),
                report.answer_tokens, f"; {len(held_out)} held-out rows" if held_out is not None else "")


def class_head(config, tokenizer, report: DataReport) -> ClassHead | None:
    """The classification head the run trains (None for causal_lm); its classes go into the resolved config."""
    if config.data.task != "classification":
        return None
    config.data.class_names = ",".join(report.class_names)
    return ClassHead.for_classes(report.class_names, tokenizer)


def log_diagnostics(trainer, signal: TeacherSignal, data: RunData) -> dict:
    """What the teacher signal reports before training, logged as train_<name> and kept for the final metrics."""
    diagnostics = signal.diagnostics(trainer, data.train, data.report)
    if diagnostics:
        trainer.log({f"train_{key}": value for key, value in diagnostics.items()})
    return diagnostics


def log_teacher_fidelity(config, trainer, models: RunModels, kd_vocab_size) -> float:
    """Mean KL between the unquantized and the quantized teacher on the first batch, logged before training."""
    reference = load_teacher(config.model, quantized=False, head=models.head).to(trainer.args.device)
    loader = trainer.get_eval_dataloader() if trainer.eval_dataset is not None else trainer.get_train_dataloader()
    batch = {key: value.to(trainer.args.device) for key, value in next(iter(loader)).items()}
    if models.head is not None:
        kl = class_fidelity_kl(reference, models.teacher, batch)
    else:
        kl = teacher_fidelity_kl(reference, models.teacher, batch, kd_vocab_size)
    del reference
    torch.cuda.empty_cache()
    logger.info("teacher fidelity: mean KL(unquantized || %s) = %.5f per answer token on the first batch",
                config.model.teacher_quantization, kl)
    trainer.log({"teacher_fidelity_kl": kl})
    return kl
