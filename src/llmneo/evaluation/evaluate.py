"""`llm-neo eval`: offline metrics on held-out rows and lm-eval tasks for a run directory or a model directory.

A language model's held-out metrics include bits per byte. A teacher with another tokenizer is compared at the
answers' aligned boundaries (evaluation/cross_tokenizer.py) instead of token by token."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import load_run_config, load_run_model
from ..config import DataArguments, ModelArguments
from ..data.alignment import PROMPT_COLUMN, AnswerAligner
from ..data.collators import AlignedCollator, make_collator
from ..data.vocabulary import build_vocabulary_map, byte_lengths, same_vocabulary
from ..data.loading import HeldOutRows, TeacherSide, build_dataset, build_datasets, held_out_arguments
from ..errors import ConfigError, NeoError
from ..lm_head import output_rows
from ..models.class_head import ClassHead
from ..models.loading import load_reading_tokenizer, load_student, load_tokenizer
from ..teacher.loading import load_teacher
from ..teachers import named_member, parse_teachers
from .classification import evaluate_classifier
from .cross_tokenizer import aligned_batches, evaluate_aligned
from .harness import HarnessTasks, TaskUnavailable, run_lm_eval
from .metrics import HeldOutOptions, evaluate_against_teacher
from .on_policy import AlignedScorer, OnPolicyEvalOptions, evaluate_on_policy
from ..models.identity import weights_identity
from ..runtime.layout import EVAL_FILE, HELD_OUT_FILE, open_target
from ..runtime.run_dir import recorded_model

logger = logging.getLogger(__name__)



@dataclass
class EvalRequest:
    target: str  # run directory or model directory
    dataset: str | None = None  # held-out rows for a model directory (a run uses its own eval split)
    teacher_model: str | None = None  # teacher for agreement and KL (a run uses its own)
    teacher_chat_template: str | None = None  # another tokenizer's teacher reads rows through this ('plain', a file)
    tasks: str | None = None  # lm-eval tasks or preset, comma-separated
    include_path: str | None = None  # folder of custom lm-eval task YAMLs
    limit: float | None = None  # lm-eval: examples per task (or a fraction)
    max_length: int | None = None  # truncate held-out rows to this many tokens (default: the run's, else 512)
    max_samples: int | None = None  # evaluate only the first this many held-out rows
    num_fewshot: int | None = None  # lm-eval: few-shot examples
    batch_size: int = 8
    skip_bad_rows: bool = False  # skip (and count) --dataset rows that cannot be used, as `distill` does
    bootstrap: int = 1000  # resamples of the held-out rows for 95% intervals (0: none); language models only
    on_policy: bool = False  # also the student's own answers scored by the teacher (evaluation/on_policy.py)
    on_policy_max_new_tokens: int = 128  # with on_policy: the answers' token budget
    teacher: str | None = None  # a run with --teachers: evaluate against this one (default: each loaded one)


def _load_target(request: EvalRequest):
    """Model, tokenizer, the run's config (for a model directory: None, or its classes when it is a classifier)."""
    opened = open_target(request.target)
    target = opened.path
    if opened.kind != "model":  # a run, or one of its checkpoints
        model, tokenizer = load_run_model(target, "eval")
        return model, tokenizer, load_run_config(opened.run_dir)
    tokenizer = load_tokenizer(str(target), role="model")
    head = ClassHead.from_saved_model(target, tokenizer)
    if head is None:  # a language model reads chat rows through its template (llm-neo's fallback if it has none)
        tokenizer = load_reading_tokenizer(str(target), role="model")
    config = {"data": {"task": "classification", "class_names": ",".join(head.labels)}} if head else None
    return load_student(ModelArguments(student_model=str(target)), head), tokenizer, config


def _task(config: dict | None) -> str:
    return ((config or {}).get("data") or {}).get("task", "causal_lm")


def _held_out_rows(request: EvalRequest, tokenizer, config: dict | None, teacher_tokenizer=None):
    """The held-out rows (across tokenizers with the teacher's own rows; with --on_policy also each row's prompt
    messages, which the teacher renders with the student's answer)."""
    rows = _all_held_out_rows(request, tokenizer, config, teacher_tokenizer)
    if rows is not None and request.max_samples is not None:
        if request.max_samples < 1:
            raise ConfigError(f"max_samples must be >= 1, got {request.max_samples}")
        rows = rows.select(range(min(request.max_samples, len(rows))))
    return rows


def _all_held_out_rows(request: EvalRequest, tokenizer, config: dict | None, teacher_tokenizer=None):
    data = (config or {}).get("data", {})
    side = TeacherSide(teacher_tokenizer, request.on_policy and teacher_tokenizer is not None)
    max_length = request.max_length or data.get("max_length", 512)
    if request.dataset is not None:
        data_args = DataArguments(dataset=request.dataset, max_length=max_length, task=_task(config),
                                  class_names=data.get("class_names"), skip_bad_rows=request.skip_bad_rows)
        return build_dataset(data_args, tokenizer, seed=0, teacher=side)[0]
    if "training" not in (config or {}):
        return None
    data_args = DataArguments(**{**config["data"], "max_length": max_length})
    seed = config["training"]["seed"]
    if data_args.eval_split:  # its own rows: the training rows are not read
        classes = data_args.class_names.split(",") if data_args.class_names else None
        return build_dataset(held_out_arguments(data_args, classes), tokenizer, seed, side)[0]
    if not data_args.eval_ratio:
        return None
    recorded = _recorded_held_out(request.target)
    if recorded is None:  # a run from before runs recorded them: split the training rows again
        return build_datasets(data_args, tokenizer, seed, side)[1]
    return build_dataset(data_args, tokenizer, seed, side, only=recorded)[0]


def _recorded_held_out(target: str) -> HeldOutRows | None:
    """The rows the run's --eval_ratio split held out, as the run recorded them."""
    path = open_target(target).run_dir / HELD_OUT_FILE
    return HeldOutRows(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def _teacher_path(request: EvalRequest, config: dict | None) -> str | None:
    return request.teacher_model or (config or {}).get("model", {}).get("teacher_model")


def _other_teacher_tokenizer(request: EvalRequest, config: dict | None, tokenizer):
    """The teacher's tokenizer when it is not the model's own (a language model compared at aligned boundaries)."""
    path = _teacher_path(request, config)
    if not path or _task(config) == "classification":
        return None
    template = request.teacher_chat_template or (config or {}).get("model", {}).get("teacher_chat_template")
    teacher_tokenizer = load_reading_tokenizer(path, role="teacher", chat_template=template)
    return None if same_vocabulary(teacher_tokenizer, tokenizer) else teacher_tokenizer


def _teacher(request: EvalRequest, config: dict | None):
    path = _teacher_path(request, config)
    if not path:
        return None
    args = ModelArguments(**{**(config or {}).get("model", {}), "teacher_model": path})
    tokenizer = load_tokenizer(path, role="teacher") if _task(config) == "classification" else None
    return load_teacher(args, quantized=False, head=ClassHead.from_run_config(config, tokenizer) if tokenizer else None)


def _which_teacher(request: EvalRequest, config: dict | None) -> dict:
    """Which teacher the figures are against (recorded in eval.json). The run's own teacher must still be the
    weights the run trained with: rewritten in place, KL and on-policy figures would silently be against another
    model, so that is refused unless the user names the teacher with --teacher_model."""
    path = _teacher_path(request, config)
    current = weights_identity(path, "teacher", "eval.json will not say which weights it had") or {"path": path}
    record = {"path": path, "sha256": current.get("sha256"), "chosen_by": "--teacher_model" if request.teacher_model
              else "the run"}
    opened = open_target(request.target)
    role = f"teacher/{request.teacher}" if request.teacher else "teacher"  # a run with --teachers records each
    recorded = recorded_model(opened.run_dir, role) if opened.run_dir is not None else None
    if recorded and recorded.get("path") == current.get("path"):
        record["same_as_the_runs_teacher"] = recorded == current
        if recorded != current and not request.teacher_model:
            raise ConfigError(f"the run's teacher {path}: its weights changed since the run trained with it, so its "
                              "KL and on-policy figures would be against another model: restore that teacher, or "
                              f"evaluate against it as it is now with --teacher_model {path} (eval.json then "
                              "records it)")
    return record


@dataclass
class EvalModels:
    """What one evaluation scores with: the model, its tokenizer and run config, and the teacher (with its own
    tokenizer when it reads other tokens)."""

    model: object
    tokenizer: object
    config: dict | None
    teacher: object = None
    teacher_tokenizer: object = None


def evaluate_target(request: EvalRequest, write: bool = True) -> dict:
    """Offline metrics (when held-out rows exist) and lm-eval task scores (when tasks are named). A run with
    --teachers is evaluated against each loaded teacher (``teachers``: name -> its figures) beside the student's own
    held-out figures, or against the one ``request.teacher`` names."""
    model, tokenizer, config = _load_target(request)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    members = _run_teachers(request, config)
    if members is None:
        results = _evaluate_with(request, EvalModels(model, tokenizer, config), device)
    else:
        alone = {**config, "model": {**config["model"], "teacher_model": None}}
        results = _evaluate_with(dataclasses.replace(request, on_policy=False), EvalModels(model, tokenizer, alone),
                                 device)
        results["teachers"] = {name: _evaluate_with(dataclasses.replace(request, teacher=name),
                                                    EvalModels(model, tokenizer, view), device)
                               for name, view in members.items()}
    if request.tasks:
        if _task(config) == "classification":
            raise ConfigError("lm-eval tasks score language models; a classifier is evaluated on held-out rows")
        try:
            results["tasks"] = run_lm_eval(model, tokenizer, HarnessTasks(
                request.tasks, request.include_path, request.limit, request.num_fewshot, request.batch_size))
        except TaskUnavailable as error:
            if not results:
                raise
            _write_results(request, results, write)  # what was measured is kept
            raise EvaluationIncomplete(str(error), results) from None
    if not results:
        raise ConfigError(f"nothing to evaluate for {request.target}: give --tasks, or --dataset for a model "
                          "directory (a run evaluates its --eval_split / --eval_ratio rows)")
    _write_results(request, results, write)
    return results


def _evaluate_with(request: EvalRequest, models: EvalModels, device) -> dict:
    """The held-out figures of one teacher (the run's config as ``models.config`` names it)."""
    models.teacher_tokenizer = _other_teacher_tokenizer(request, models.config, models.tokenizer)
    held_out = _held_out_rows(request, models.tokenizer, models.config, models.teacher_tokenizer)
    if request.on_policy and held_out is None:
        raise ConfigError(f"--on_policy answers held-out prompts: {request.target} has none (give --dataset, or a run "
                          "with --eval_split / --eval_ratio)")
    return _held_out_results(request, models, held_out, device) if held_out is not None else {}


def _run_teachers(request: EvalRequest, config: dict | None) -> dict[str, dict] | None:
    """A run with --teachers: its config as each loaded teacher's (name -> config), or the one --teacher names;
    None for a run with one teacher (or none), or when --teacher_model names the teacher."""
    members = parse_teachers(((config or {}).get("distill") or {}).get("teachers"))
    if members and request.teacher_model:
        return None
    if request.teacher is not None:
        members = [named_member(members, request.teacher, "eval", f"{request.target} is not a run with --teachers")]
    if not members:
        return None
    chosen = [member for member in members if member.get("model")]
    if not chosen:
        raise ConfigError(f"eval --teacher {request.teacher}: that teacher is served or cached, and eval scores with "
                          "a loaded teacher: give its model with --teacher_model")
    return {member["name"]: {**config, "model": {**config["model"], "teacher_model": member["model"],
                                                 "teacher_chat_template": member.get("chat_template")}}
            for member in chosen}


class EvaluationIncomplete(NeoError):
    """Part of an evaluation failed; ``results`` holds what was measured (written to a run's eval.json)."""

    def __init__(self, message: str, results: dict):
        super().__init__(message)
        self.results = results


def results_path(target: str) -> Path | None:
    """Where `eval` writes a target's results: a run's eval.json; nowhere for a model directory (left untouched)."""
    return Path(target) / EVAL_FILE if open_target(target).kind == "run" else None


def _write_results(request: EvalRequest, results: dict, write: bool) -> None:
    path = results_path(request.target)
    if write and path is not None:
        path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def _held_out_results(request: EvalRequest, models: EvalModels, held_out, device) -> dict:
    """The held-out metrics (against the teacher, where there is one), on-policy figures when asked, and which
    teacher they are against."""
    # which teacher, checked before it loads; recorded after the metrics (eval.json opens with them)
    which = _which_teacher(request, models.config) if _teacher_path(request, models.config) else None
    teacher = _teacher(request, models.config)
    models.teacher = teacher.to(device) if teacher is not None else None
    results = {"held_out": _held_out_metrics(request, models, held_out)}
    if request.on_policy:
        results["on_policy"] = _on_policy(request, models, held_out)
    if which is not None:
        results["teacher"] = which
    return results


def _held_out_metrics(request: EvalRequest, models: EvalModels, held_out) -> dict:
    model, tokenizer, teacher, teacher_tokenizer = models.model, models.tokenizer, models.teacher, models.teacher_tokenizer
    collator = make_collator(tokenizer, _task(models.config))
    same_tokens = None if teacher_tokenizer else teacher
    if _task(models.config) == "classification":
        return evaluate_classifier(model, held_out, collator, teacher=same_tokens, batch_size=request.batch_size,
                                   progress=True)
    options = HeldOutOptions(batch_size=request.batch_size, progress=True, bootstrap=request.bootstrap,
                             byte_lengths=byte_lengths(tokenizer))
    metrics = evaluate_against_teacher(model, held_out, collator, same_tokens, options)
    if teacher_tokenizer is not None and teacher is not None:
        vocab_map = build_vocabulary_map(teacher_tokenizer, tokenizer, output_rows(teacher), output_rows(model))
        aligned = AlignedCollator(collator, tokenizer.padding_side, teacher_tokenizer.pad_token_id)
        metrics.update(evaluate_aligned(model, teacher, aligned_batches(held_out, aligned, request.batch_size), vocab_map,
                                        bootstrap=request.bootstrap))
    return metrics


def _on_policy(request: EvalRequest, models: EvalModels, held_out) -> dict:
    if _task(models.config) == "classification" or models.teacher is None:
        raise ConfigError("--on_policy needs a language model and a teacher (--teacher_model, or the run's)")
    options = OnPolicyEvalOptions(max_new_tokens=request.on_policy_max_new_tokens, bootstrap=request.bootstrap,
                                  batch_size=request.batch_size)
    scorer, tokenizer, teacher_tokenizer = None, models.tokenizer, models.teacher_tokenizer
    if teacher_tokenizer is not None:  # the teacher reads its own rendering, aligned as on-policy training does
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        aligner = AnswerAligner(tokenizer, teacher_tokenizer, held_out[PROMPT_COLUMN])
        scorer = AlignedScorer(models.model, models.teacher, aligner, pad_id, teacher_tokenizer.pad_token_id,
                               request.batch_size)
    return evaluate_on_policy(models.model, models.teacher, tokenizer, held_out, options, scorer)


def flatten(results: dict) -> dict[str, float]:
    """One level: held-out and on-policy metrics by name, task metrics as ``task/metric``."""
    flat = dict(results.get("held_out", {}))
    flat.update({key: value for key, value in results.get("on_policy", {}).items()
                 if isinstance(value, (int, float))})
    for task, metrics in results.get("tasks", {}).items():
        flat.update({f"{task}/{metric}": value for metric, value in metrics.items()})
    for name, figures in results.get("teachers", {}).items():  # a run with --teachers: each teacher's figures
        flat.update({f"{key}/{name}": value for key, value in flatten(figures).items() if key not in flat})
    return flat
