"""One distillation run end to end, read top to bottom in ``distill``: config -> data -> models (teacher online or
its cache) -> trainer -> artifacts. Each step is a call into the module that owns it; this module only orchestrates.
"""

from __future__ import annotations

import errno
import json
import logging
import shlex
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import prepare_model_for_kbit_training
from transformers import set_seed

from .adapters.lora import PEFT_TASK_TYPES, add_lora, lora_config
from .adapters.store import KIND_FILE, kind_record, save_initial_adapter
from .artifacts import (resolved_config, run_settings, save_final_weights, save_resolved_config,
                        write_model_card)
from .data.collators import make_collator
from .data.vocabulary import build_vocabulary_map
from .losses.vocab_map import VocabularyMap, load_vocabulary_map
from .data.alignment import PROMPT_COLUMN, AnswerAligner
from .data.loading import DataReport, build_datasets
from .data.packing import PackingCollator
from .errors import ConfigError, DiskFullError, NonFiniteError, TeacherServerError, TrainingOutOfMemory, VocabularyError
from .evaluation.classification import class_fidelity_kl
from .evaluation.metrics import teacher_fidelity_kl
from .methods import METHODS
from .models.class_head import ClassHead
from .models.loading import (check_quantization, is_quantized, load_reading_tokenizer, load_student,
                             load_student_tokenizer, load_tokenizer)
from .models.vocabulary_check import check_vocabularies
from .models.identity import data_fingerprint, model_identity
from .lm_head import output_rows
from .evaluation.before_after import compare_with_before, measure_before
from .report import write_run_report
from .runtime.checkpoints import checkpoint_step, complete_checkpoints
from .runtime.identity import check_resume, identity_bytes, run_identity
from .runtime.lock import DirectoryLock
from .runtime.planner import plan_micro_batch
from .runtime.processes import check_processes
from .runtime.resume import cut_metrics, resolve_checkpoint
from .runtime.run_dir import claim_output_dir, mark_failed, mark_finished, mark_started
from .teacher.cache import TeacherCache, cached_vocab_size, open_teacher_cache
from .teacher.loading import load_teacher
from .teacher.signal import NoTeacher, TeacherSignal
from .teacher.server import ServerSettings, TeacherServer
from .teacher.sources import AlignedCachedTeacher, AlignedOnlineTeacher, CachedTeacher, OnlineTeacher, ServedTeacher
from .training import ClassifierTrainer, MetricsJsonlCallback, NeoTrainer
from .runtime.layout import IDENTITY_FILE, METRICS_FILE

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
class RunOutcome:
    """What the model card and the report say about a finished run."""

    report: DataReport
    final_metrics: dict
    comparison: list | None = None  # before/after rows of the held-out metrics
    samples: dict | None = None  # held-out prompts with the teacher's and the student's answers


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


@contextmanager
def failure_marked(config):
    """A started run that stops on an error is marked "failed" in run.json with the error (never left
    "running"); a kill cannot be marked, and is told from a live run by the run directory's lock."""
    try:
        yield
    except BaseException as error:
        if config.training.process_index == 0:
            mark_failed(config.training.output_dir, error)
        raise


def disk_full_message(error: OSError, run_dir) -> str:
    complete = complete_checkpoints(run_dir)
    resume = (f"the last complete checkpoint is {complete[-1][1].name}: free some space, then resume with "
              "--resume_from_checkpoint latest" if complete else "no checkpoint was complete yet")
    return f"disk full writing {error.filename or run_dir}; {resume}"


def train_and_write(config, callbacks=()) -> RunSummary:
    claim_run_dir(config)
    set_seed(config.training.seed)
    tokenizer = load_student_tokenizer(config.model, config.data.task)
    served = connect_served_teacher(config, tokenizer)  # before any model loads: the server must answer
    teacher_tokenizer = reading_teacher_tokenizer(config)
    keep_prompts = teacher_tokenizer is not None and config.training.on_policy_fraction > 0
    dataset, held_out, report = build_datasets(config.data, tokenizer, config.training.seed, teacher_tokenizer,
                                               keep_prompts)
    check_on_policy_rows(config, report)
    log_data(report, held_out)
    head = class_head(config, tokenizer, report)
    data = data_fingerprint(dataset, config.data.dataset)
    base = student_identity(config) if METHODS[config.training.method].uses_adapter else None
    cache = open_teacher_cache(config, tokenizer, dataset, data) if config.training.teacher_cache else None
    dataset = dataset.add_column("row_id", list(range(len(dataset))))  # names rows in messages; keys the cache
    student, teacher, kd_vocab_size = load_models(config, tokenizer, head, cache)
    if served is not None:
        served = ServedTeacher(*served, config.training.teacher_top_k, min(len(tokenizer), output_rows(student)),
                               dataset, deferred=config.training.on_policy_fraction > 0)
    signal = served or teacher_signal(config, tokenizer, teacher_tokenizer, student, teacher, kd_vocab_size, cache,
                                      dataset)
    identity = run_identity(resolved_config(config), data, signal.identity(), read_models(config, base, teacher))
    resume = prepare_run_dir(config, identity)
    with failure_marked(config):
        run_dir = Path(config.training.output_dir)
        initial_adapter = save_initial_adapter(student, run_dir) if saves_adapter(config) else None
        trainer = build_trainer(config, student, signal, dataset, tokenizer, callbacks, held_out,
                                checkpoint_files(config, identity, base))
        if config.training.auto_micro_batch:
            plan_micro_batch(trainer, dataset, config.training.auto_micro_batch_budget_gib)
        quantized_teacher = teacher is not None and is_quantized(teacher)
        fidelity = log_teacher_fidelity(config, trainer, teacher, kd_vocab_size, head) if quantized_teacher else None
        diagnostics = log_diagnostics(trainer, signal, dataset, report)
        before = measure_before(trainer, config, tokenizer, held_out, resume, signal.teacher_tokenizer)
        try:
            result = train_or_explain(trainer, config, resume)
        finally:
            signal.close()
        final_metrics = {**collect_final_metrics(trainer, result, report, held_out is not None, fidelity), **diagnostics}
        outcome = RunOutcome(report, final_metrics, *compare_with_before(trainer, tokenizer, before, final_metrics))
        weights_dir = write_artifacts(trainer, config, tokenizer, outcome, initial_adapter, base)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        return RunSummary(Path(config.training.output_dir), weights_dir, trainer.state.global_step, final_metrics, report,
                          config, trainable, trainer.items_seen())


def check_on_policy_rows(config, report: DataReport) -> None:
    """On-policy steps answer each row's prompt: plain text rows have none (every token is trained on)."""
    if config.training.on_policy_fraction > 0 and report.data_format == "text":
        raise ConfigError(f"on_policy_fraction {config.training.on_policy_fraction:g}: {config.data.dataset} has "
                          "plain 'text' rows, with no prompt for the student to answer; on-policy steps need rows "
                          "with a prompt (messages, conversations, or prompt and completion)")


def connect_served_teacher(config, tokenizer) -> tuple[TeacherServer, dict] | None:
    """The served teacher (--teacher_server), checked: it answers, serves the student's tokenizer and returns
    --teacher_top_k log-probabilities; with its fingerprint."""
    if config.training.teacher_server is None:
        return None
    server, fingerprint = TeacherServer.open(ServerSettings.from_config(config.training), tokenizer,
                                             config.training.teacher_top_k, "--teacher_top_k")
    logger.info("teacher server %s: %s, top-%d per answer token; the teacher is not loaded",
                config.training.teacher_server, server.model, config.training.teacher_top_k)
    return server, fingerprint


def reading_teacher_tokenizer(config):
    """The teacher's own tokenizer when it reads its own rendering of each row (across tokenizers, online); a
    cache across tokenizers holds the teacher's aligned rows already."""
    if not config.training.cross_tokenizer or config.training.teacher_cache:
        return None
    return load_reading_tokenizer(config.model.teacher_model, config.model.trust_remote_code, "teacher",
                                  chat_template=config.model.teacher_chat_template)


def teacher_signal(config, tokenizer, teacher_tokenizer, student, teacher, kd_vocab_size,
                   cache: TeacherCache | None, dataset=None) -> TeacherSignal:
    """The run's teacher source (teacher/sources.py), chosen here once; ``dataset``: the training rows, whose
    prompt messages an on-policy run across tokenizers renders for the teacher."""
    mode = config.training.cross_tokenizer
    if cache is not None and cache.across_tokenizers:
        vocab_map = cached_vocabulary_map(cache, tokenizer, student)
        signal = AlignedCachedTeacher(cache, vocab_map, mode, tokenizer.padding_side)
    elif cache is not None:
        signal = CachedTeacher(cache, kd_vocab_size)
    elif teacher is not None and teacher_tokenizer is not None:
        vocab_map = cross_vocabulary_map(config, tokenizer, teacher_tokenizer, student, teacher)
        answers = (AnswerAligner(tokenizer, teacher_tokenizer, dataset[PROMPT_COLUMN])
                   if dataset is not None and PROMPT_COLUMN in dataset.column_names else None)
        signal = AlignedOnlineTeacher(teacher, teacher_tokenizer, vocab_map, mode, answers)
    elif teacher is not None:
        signal = OnlineTeacher(teacher, kd_vocab_size)
    else:
        signal = NoTeacher()
    logger.info("teacher signal: %s", type(signal).__name__)
    return signal


def lock_run_dir(config):
    """The main process holds the run directory for the whole run; a second run into it fails at once."""
    main = config.training.process_index == 0
    return DirectoryLock(config.training.output_dir, "llm-neo distill") if main else nullcontext()


def claim_run_dir(config) -> None:
    """Refuse an output_dir holding another run (unless --overwrite_output_dir, which clears it first)."""
    if config.training.process_index == 0:
        claim_output_dir(config.training.output_dir, config.training.overwrite_output_dir,
                         resuming=bool(config.training.resume_from_checkpoint))


def checkpoint_files(config, identity: dict, base: dict | None) -> dict[str, bytes]:
    """Written into every checkpoint: the run's identity (checked on resume) and, for adapter methods, the
    adapter kind and its ``base`` (so a checkpoint can be merged on its own)."""
    files = {IDENTITY_FILE: identity_bytes(identity)}
    if METHODS[config.training.method].uses_adapter:
        record = kind_record(config.adapter, base)
        files[KIND_FILE] = (json.dumps(record, indent=2) + "\n").encode("utf-8")
    return files


def student_identity(config) -> dict | None:
    """The identity of the student's base weights, or None when it cannot be read (a hub id offline)."""
    return weights_identity(config.model.student_model, "student", "merging and resuming will not check its base")


def weights_identity(path: str, role: str, consequence: str) -> dict | None:
    try:
        return model_identity(path, sample_weights=True)
    except (OSError, ValueError) as error:
        logger.warning("cannot fingerprint the %s %s (%s): %s", role, path, error, consequence)
        return None


def read_models(config, base: dict | None, teacher) -> dict:
    """The weights a resume reads again from their paths rather than from the checkpoint: an adapter's frozen base
    and an online teacher (a cached teacher is checked by its cache's manifest). Rewritten in place, they would
    mix two models into one run, so the run identity records them."""
    models = {"student": base} if base else {}
    if teacher is not None and config.model.teacher_model:
        models["teacher"] = weights_identity(config.model.teacher_model, "teacher", "resuming will not check it")
    return models


def log_data(report: DataReport, held_out) -> None:
    logger.info("data: %d rows used, %d skipped, %d answer tokens%s", report.rows_used, len(report.skipped),
                report.answer_tokens, f"; {len(held_out)} held-out rows" if held_out is not None else "")


def class_head(config, tokenizer, report: DataReport) -> ClassHead | None:
    """The classification head the run trains (None for causal_lm); its classes go into the resolved config."""
    if config.data.task != "classification":
        return None
    config.data.class_names = ",".join(report.class_names)
    return ClassHead.for_classes(report.class_names, tokenizer)


def load_models(config, tokenizer, head: ClassHead | None = None, cache: TeacherCache | None = None):
    """Student (with adapter for lora/neo), teacher or None, and the vocabulary size the KD term uses (with a
    teacher cache: the one it was captured over; the teacher is not loaded)."""
    preset = METHODS[config.training.method]
    student = load_student(config.model, head)
    teacher, kd_vocab_size = None, None
    if cache is not None:  # across tokenizers the vocabulary map, not a shared size, relates the two
        kd_vocab_size = None if cache.across_tokenizers else cached_vocab_size(cache, output_rows(student))
    elif preset.uses_teacher and config.training.teacher_cache is None and config.training.teacher_server is None:
        teacher = load_teacher(config.model, head=head)
        if not config.training.cross_tokenizer:
            teacher_tokenizer = load_tokenizer(config.model.teacher_model, config.model.trust_remote_code, "teacher")
            sizes = (student, teacher) if head is None else (len(tokenizer), len(teacher_tokenizer))  # inputs only
            kd_vocab_size = check_vocabularies(tokenizer, teacher_tokenizer, *sizes)
    if preset.uses_adapter:
        if is_quantized(student):  # QLoRA: fp32 norms, input grads for checkpointing
            # activation_checkpointing is the newer transformers 5 name of gradient_checkpointing (absent in 5.17)
            checkpointing = getattr(config.training, "activation_checkpointing", False) or \
                config.training.gradient_checkpointing
            student = prepare_model_for_kbit_training(student, use_gradient_checkpointing=checkpointing)
        student = add_lora(student, config.adapter, config.data.task)
    return student, teacher, kd_vocab_size


def build_trainer(config, student, signal: TeacherSignal, dataset, tokenizer, callbacks=(), eval_dataset=None,
                  checkpoint_files=None) -> NeoTrainer | ClassifierTrainer:
    """The run's trainer; it reads the loss settings from ``config.training`` (NeoTrainingArguments)."""
    padded = signal.collator(make_collator(tokenizer, config.data.task), tokenizer)
    packing = PackingCollator(config.model.attn_implementation) if config.data.packing else None
    common = {"model": student, "args": config.training, "train_dataset": dataset, "eval_dataset": eval_dataset,
              "data_collator": packing or padded, "eval_collator": padded, "processing_class": tokenizer,
              "checkpoint_files": checkpoint_files,
              "callbacks": [MetricsJsonlCallback(str(Path(config.training.output_dir) / METRICS_FILE)), *callbacks]}
    if config.data.task == "classification":
        return ClassifierTrainer(**common, teacher=signal.teacher)
    return NeoTrainer(**common, signal=signal)


def cached_vocabulary_map(cache: TeacherCache, tokenizer, student) -> VocabularyMap:
    """The vocabulary map a cache across tokenizers was captured with, checked against this student."""
    vocab_map = cache.vocabulary_map()
    student_size = min(len(tokenizer), output_rows(student))
    if vocab_map.student_size != student_size:
        raise VocabularyError(f"teacher cache {cache.cache_dir} was captured for a student of "
                              f"{vocab_map.student_size} ids, this student has {student_size}")
    return vocab_map


def cross_vocabulary_map(config, tokenizer, teacher_tokenizer, student, teacher) -> VocabularyMap:
    """The map between the two vocabularies: the one saved in the run directory, or built now and saved there."""
    run_dir = config.training.output_dir
    sizes = (min(len(teacher_tokenizer), output_rows(teacher)), min(len(tokenizer), output_rows(student)))
    saved = load_vocabulary_map(run_dir) if config.training.resume_from_checkpoint else None
    if saved is not None and (saved.teacher_size, saved.student_size) == sizes:
        return saved
    vocab_map = build_vocabulary_map(teacher_tokenizer, tokenizer, output_rows(teacher),
                                     output_rows(student))
    if config.training.process_index == 0:
        vocab_map.save(run_dir)
    logger.info("vocabulary map: %d of the student's %d ids have a teacher id with the same bytes (teacher %d ids)",
                len(vocab_map), vocab_map.student_size, vocab_map.teacher_size)
    return vocab_map


def log_diagnostics(trainer, signal: TeacherSignal, dataset, report: DataReport) -> dict:
    """What the teacher signal reports before training, logged as train_<name> and kept for the final metrics."""
    diagnostics = signal.diagnostics(trainer, dataset, report)
    if diagnostics:
        trainer.log({f"train_{key}": value for key, value in diagnostics.items()})
    return diagnostics


def log_teacher_fidelity(config, trainer, teacher, kd_vocab_size, head: ClassHead | None = None) -> float:
    """Mean KL between the unquantized and the quantized teacher on the first batch, logged before training."""
    reference = load_teacher(config.model, quantized=False, head=head).to(trainer.args.device)
    loader = trainer.get_eval_dataloader() if trainer.eval_dataset is not None else trainer.get_train_dataloader()
    batch = {key: value.to(trainer.args.device) for key, value in next(iter(loader)).items()}
    if head is not None:
        kl = class_fidelity_kl(reference, teacher, batch)
    else:
        kl = teacher_fidelity_kl(reference, teacher, batch, kd_vocab_size)
    del reference
    torch.cuda.empty_cache()
    logger.info("teacher fidelity: mean KL(unquantized || %s) = %.5f per answer token on the first batch",
                config.model.teacher_quantization, kl)
    trainer.log({"teacher_fidelity_kl": kl})
    return kl


def prepare_run_dir(config, identity: dict) -> str | None:
    """Check a checkpoint to resume against this run's identity; write the resolved config and run.json; start
    metrics.jsonl afresh, or cut it back to the checkpoint resumed from (its path is returned)."""
    run_dir = Path(config.training.output_dir)
    resume = resolve_checkpoint(run_dir, config.training.resume_from_checkpoint)
    if resume is not None:
        check_resume(resume, identity)
    if config.training.process_index == 0:
        save_resolved_config(run_dir, config)
        mark_started(run_dir, config.training.method, identity.get("models"))
        if resume is None:
            (run_dir / METRICS_FILE).unlink(missing_ok=True)
        else:
            cut_metrics(run_dir / METRICS_FILE, checkpoint_step(resume))
    return resume


def saves_adapter(config) -> bool:
    return METHODS[config.training.method].uses_adapter and config.training.process_index == 0


def check_before_loading(config) -> None:
    """Settings that can only be judged against this machine or PEFT fail here, before data and models load."""
    check_processes(config.training.world_size)
    check_quantization(config.model)
    if METHODS[config.training.method].uses_adapter:
        lora_config(config.adapter, PEFT_TASK_TYPES[config.data.task])


def train_or_explain(trainer, config, resume):
    """Train; on a non-finite step or out of memory, save what can be saved and stop with what to change."""
    try:
        return trainer.train(resume_from_checkpoint=resume)
    except NonFiniteError as error:
        saved = _save_last_good_step(trainer)
        raise NonFiniteError(f"{error}. {saved}") from None
    except TeacherServerError as error:
        saved = _save_last_good_step(trainer, resume_hint=False)
        then = (resume_command(config) if complete_checkpoints(config.training.output_dir) else
                "Run the same command again once the server answers (there is nothing to resume).")
        raise TeacherServerError(f"{error}. {saved} {then}") from None
    except torch.OutOfMemoryError:
        saved = _save_last_good_step(trainer)
        args = config.training
        tokens = args.per_device_train_batch_size * config.data.max_length
        raise TrainingOutOfMemory(
            f"out of memory at step {trainer.state.global_step + 1} with up to {tokens} tokens per micro-batch "
            f"({args.per_device_train_batch_size} rows x max_length {config.data.max_length}). {saved} Try a smaller "
            f"--per_device_train_batch_size (with more --gradient_accumulation_steps), --auto_micro_batch, a smaller "
            f"--kd_chunk_size (now {config.training.kd_chunk_size}), --activation_checkpointing true, "
            "--packing, or take the teacher out of memory with --teacher_cache or --teacher_quantization nf4"
        ) from None


def _save_last_good_step(trainer, resume_hint: bool = True) -> str:
    if trainer.state.global_step == 0:
        return "No step had finished, so nothing was saved."
    try:
        trainer.save_checkpoint_now()
    except Exception as error:  # saving is best effort here: the original failure is what matters
        return f"Saving a checkpoint failed too ({type(error).__name__}: {error})."
    hint = " (resume with --resume_from_checkpoint latest)" if resume_hint else ""
    return f"The last good step was saved as checkpoint-{trainer.state.global_step}{hint}."


def resume_command(config) -> str:
    """How to continue the run: the command line it was started with (when started from the CLI), resuming."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if not skip and not arg.startswith("--resume_from_checkpoint"):
            args.append(arg)
        skip = arg == "--resume_from_checkpoint"  # its value follows it
    if Path(sys.argv[0]).name == "llm-neo" and args[:1] == ["distill"]:
        return "Resume with: llm-neo " + shlex.join([*args, "--resume_from_checkpoint", "latest"])
    return f"Resume with the same options and --resume_from_checkpoint latest (run {config.training.output_dir})."


def final_evaluation(trainer) -> dict:
    """The held-out metrics after the last step: logged already when the Trainer evaluated at that step."""
    step = trainer.state.global_step
    logged = [entry for entry in trainer.state.log_history
              if entry.get("step") == step and any(key.startswith("eval_") for key in entry)]
    if logged:
        return {key: value for key, value in logged[-1].items() if key.startswith("eval_")}
    return trainer.evaluate()


def last_logged_terms(log_history: list[dict]) -> dict:
    """CE and KD of the last logging step, for the model card."""
    logged = [entry for entry in log_history if "ce_loss" in entry]
    return {key: logged[-1][key] for key in ("ce_loss", "kd_loss")} if logged else {}


def collect_final_metrics(trainer, result, report: DataReport, has_held_out: bool, fidelity: float | None) -> dict:
    """What the model card and report state about the end of the run."""
    final_metrics = {"train_loss": round(result.training_loss, 6), **last_logged_terms(trainer.state.log_history)}
    if has_held_out:
        final_metrics.update(final_evaluation(trainer))
    if fidelity is not None:
        final_metrics["teacher_fidelity_kl"] = round(fidelity, 6)
    if trainer.bad_steps:
        final_metrics["skipped_steps"] = trainer.bad_steps
    if report.skipped:
        final_metrics["skipped_rows"] = len(report.skipped)
    return final_metrics


def gathered_state_dict(trainer) -> dict:
    """The full weights of a sharded model, gathered by every process. On CPU processes accelerate's FSDP2 gather
    hands back the shards (DTensors) still: those are gathered here."""
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return {name: value.full_tensor() if hasattr(value, "full_tensor") else value for name, value in state_dict.items()}


def write_artifacts(trainer, config, tokenizer, outcome: RunOutcome, initial_adapter, base: dict | None = None) -> Path:
    """The final adapter or weights, the model card and the run report (main process only); the weights' folder."""
    run_dir = Path(config.training.output_dir)
    # Sharded weights (FSDP2, ZeRO-3) are gathered by every process together, before the others leave.
    state_dict = gathered_state_dict(trainer) if trainer.parameters_sharded() else None
    if not trainer.is_world_process_zero():
        return run_dir
    model = trainer.accelerator.unwrap_model(trainer.model)
    weights_dir = save_final_weights(model, tokenizer, run_dir, config, initial_adapter, base, state_dict)
    steps, report = trainer.state.global_step, outcome.report
    write_model_card(run_dir, config, steps, report, outcome.final_metrics, outcome.comparison)
    write_run_report(run_dir, outcome.final_metrics, run_settings(config, steps, report), outcome.comparison,
                     outcome.samples)
    mark_finished(run_dir, trainer.state.global_step)
    return weights_dir
