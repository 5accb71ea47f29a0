"""What a run leaves in its directory: resolved config, final weights, model card; and merging an adapter run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from .adapters.store import adapter_kind, base_mutating_init, load_adapter, save_adapter
from .config import ModelArguments
from .errors import ConfigError
from .methods import METHODS
from .models.class_head import ClassHead
from .models.loading import check_model_path, load_student, load_tokenizer
from .models.identity import model_identity
from .data.loading import DataReport
from .report import before_after_markdown, write_run_report
from .runtime.checkpoints import checkpoint_step, is_complete
from .runtime.model_dir import check_model_files, model_directory, seal_directory
from .runtime.run_dir import mark_finished, require_finished, require_new_output
from .runtime.layout import ADAPTER_DIR, CARD_FILE, CONFIG_FILE, METRICS_FILE, MODEL_DIR, open_target

logger = logging.getLogger(__name__)



def save_resolved_config(run_dir: Path, config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    config.to_yaml(run_dir / CONFIG_FILE)


def load_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: {CONFIG_FILE} is missing")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class FinalWeights:
    """What the final save writes, and what it needs to write it right."""

    model: object  # the trained model, unwrapped
    tokenizer: object
    state_dict: dict | None = None  # the gathered weights of a sharded model
    initial_adapter: Path | None = None  # PiSSA/OLoRA: the adapter at initialisation, which the save converts against
    base: dict | None = None  # the identity of the base weights an adapter was trained on


def save_final_weights(weights: FinalWeights, run_dir: Path, config) -> Path:
    """Adapter (PEFT safetensors, see adapters/store.py) or full weights (safetensors) with the tokenizer."""
    if METHODS[config.training.method].uses_adapter:
        target = save_adapter(weights.model, run_dir / ADAPTER_DIR, config.adapter, weights.initial_adapter,
                              weights.base, weights.state_dict)
    else:
        target = run_dir / MODEL_DIR
        weights.model.save_pretrained(target, state_dict=weights.state_dict)
    weights.tokenizer.save_pretrained(target)
    seal_directory(target)
    return target


def run_settings(config, steps: int, data_report) -> list[tuple[str, object]]:
    """What the model card and the run report say about how the run was made."""
    method, distill, adapter = config.training.method, config.training, config.adapter
    preset, classes = METHODS[method], data_report.class_names  # classes: set only for --task classification
    return [
        ("method", method),
        *(_teachers_rows(distill) if distill.teachers else [
            ("teacher", config.model.teacher_model or ("(see the cache)" if distill.teacher_cache
                                                      else distill.teacher_server or "(none: CE only)")),
            ("teacher cache", f"{distill.teacher_cache} ({distill.cache_tail} tail)" if distill.teacher_cache
             else "none")]),
        ("student", config.model.student_model),
        ("data", f"{config.data.dataset} ({data_report.data_format}, {data_report.rows_used} rows used, "
                 f"{len(data_report.skipped)} skipped, {data_report.answer_tokens} "
                 f"{'labelled texts' if classes else 'answer tokens'})"),
        ("task", f"classification into {', '.join(classes)}" if classes else config.data.task),
        ("alpha (CE weight)", distill.alpha if preset.uses_teacher else "CE only"),
        ("temperature", distill.temperature if preset.uses_teacher else "CE only"),
        ("adapter", adapter.adapter if preset.uses_adapter else "none: full fine-tune"),
        ("LoRA rank / alpha", f"{adapter.lora_r} / {adapter.lora_alpha}" if preset.uses_adapter else "full fine-tune"),
        ("learning rate", config.training.learning_rate),
        ("optimizer steps", steps),
    ]


def _teachers_rows(distill) -> list[tuple[str, object]]:
    """--teachers: one row per teacher (its source and tokenizer mode; a mixture's weight), and the routing."""
    weights = distill.teacher_weights.split(",") if distill.teacher_weights else None
    rows = []
    for index, member in enumerate(distill.teachers):
        source = ", ".join(f"{key} {member[key]}" for key in ("model", "server", "cache") if member.get(key))
        mode = f"; cross_tokenizer {member['cross_tokenizer']}" if member.get("cross_tokenizer") else ""
        weight = (f"; weight {weights[index] if weights else f'{1 / len(distill.teachers):g}'}"
                  if distill.teacher_routing == "mixture" else "")
        rows.append((f"teacher {member['name']}", f"{source}{mode}{weight}"))
    column = f" (column '{distill.teacher_column}')" if distill.teacher_routing == "column" else ""
    return [*rows, ("teacher routing", f"{distill.teacher_routing}{column}")]


def write_model_card(run_dir: Path, config, steps: int, data_report, final_metrics: dict,
                     before_after: list[tuple] | None = None) -> Path:
    method, preset = config.training.method, METHODS[config.training.method]
    rows = run_settings(config, steps, data_report)
    rows += [(f"final {key}", value) for key, value in final_metrics.items()]
    lines = [f"# llm-neo run: {method}", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    lines += before_after_markdown(before_after or [])
    lines += ["", f"Weights: `{ADAPTER_DIR if preset.uses_adapter else MODEL_DIR}/` (safetensors). "
                  f"Config: `{CONFIG_FILE}`. Metrics: `{METRICS_FILE}` (plotted in `training_curves.png`, "
                  "summarised in `report.md`).", ""]
    path = run_dir / CARD_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def run_adapter_dir(path: str | Path, command: str = "export-lora") -> Path:
    """The adapter directory of a finished run, or ``path`` itself when it is an adapter directory (a checkpoint)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        require_finished(path, command)
    return path / ADAPTER_DIR if (path / ADAPTER_DIR).is_dir() else path


def run_weights(path: str | Path, command: str) -> tuple[dict, Path, Path]:
    """The run config, adapter dir and full-weights dir of a finished run, or of one of its checkpoints named
    explicitly (``RUN/checkpoint-K``)."""
    target = open_target(path, models=False)
    path = target.path
    if target.kind == "run":
        require_finished(path, command)
        return load_run_config(path), path / ADAPTER_DIR, path / MODEL_DIR
    if not is_complete(path):
        raise ConfigError(f"checkpoint {path} is incomplete (its save was interrupted)")
    init = base_mutating_init(path)
    if init is not None:
        raise ConfigError(f"checkpoint {path} holds an adapter initialised with {init}, for the base as that "
                          "initialisation modified it: resume the run to finish it (its final save converts the "
                          "adapter for the original base)")
    logger.info("using checkpoint %s of run %s (step %d)", path.name, target.run_dir, checkpoint_step(path))
    return load_run_config(target.run_dir), path, path


def check_base(adapter_dir: Path, student_path: str) -> None:
    """The base the adapter is merged into must be the one it was trained on."""
    recorded = adapter_kind(adapter_dir).get("base")
    if not recorded or "sha256" not in recorded:
        return
    current = model_identity(student_path, sample_weights=True)
    if current != recorded:
        raise ConfigError(f"the student {student_path} is not the base the adapter in {adapter_dir} was trained on "
                          "(its config or weights changed since the run): restore that model, or train again")


def load_run_model(run_dir: str | Path, command: str = "merge", dtype: str | None = None):
    """A finished run's student (or a checkpoint's) as one standalone model (adapter merged into full weights) and
    its tokenizer; ``dtype``: the weights' dtype, instead of the run's --dtype."""
    config, adapter_dir, model_dir = run_weights(run_dir, command)
    overrides = {"student_quantization": "none", **({"dtype": dtype} if dtype else {})}  # merge into full weights
    model_args = ModelArguments(**{**config["model"], **overrides})
    if (adapter_dir / "adapter_config.json").is_file():
        check_model_path(model_args.student_model, "student")  # a missing base is named, not asked of the hub
        check_model_files(model_args.student_model, "student")  # a half-written base is named, not "changed"
        check_base(adapter_dir, model_args.student_model)
        tokenizer = load_tokenizer(str(adapter_dir), role="adapter")
        base = load_student(model_args, ClassHead.from_run_config(config, tokenizer))
        return load_adapter(base, adapter_dir).merge_and_unload(), tokenizer
    if (model_dir / "config.json").is_file():
        model_args.student_model = str(model_dir)
        tokenizer = load_tokenizer(str(model_dir), role="run")
        return load_student(model_args, ClassHead.from_run_config(config, tokenizer)), tokenizer
    raise ConfigError(f"{run_dir} holds neither an adapter nor model weights")


def merge_run(run_dir: str | Path, output: str | Path, dtype: str | None = None) -> Path:
    """Write a standalone model (base + adapter merged) that `AutoModelForCausalLM.from_pretrained` (or, for a
    classification run, `AutoModelForSequenceClassification.from_pretrained`) loads; ``dtype``: the merged weights'
    dtype (default: the run's --dtype, bf16 on a GPU)."""
    require_new_output(output)
    merged, tokenizer = load_run_model(run_dir, "merge", dtype)
    with model_directory(output) as partial:
        merged.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return Path(output)


@dataclass
class RunOutcome:
    """What the model card and the report say about a finished run."""

    report: DataReport
    final_metrics: dict
    comparison: list | None = None  # before/after rows of the held-out metrics
    samples: dict | None = None  # held-out prompts with the teacher's and the student's answers


def final_evaluation(trainer) -> dict:
    """The held-out metrics after the last step: logged already when the Trainer evaluated at that step."""
    step = trainer.state.global_step
    logged = [entry for entry in trainer.state.log_history
              if entry.get("step") == step and any(key.startswith("eval_") for key in entry)]
    if logged:
        return {key: value for key, value in logged[-1].items() if key.startswith("eval_")}
    return trainer.evaluate()


def last_logged_terms(log_history: list[dict]) -> dict:
    """CE and KD of the last logging step, and each teacher's KD term beside it (--teachers), for the model card."""
    logged = [entry for entry in log_history if "ce_loss" in entry]
    return {key: value for key, value in logged[-1].items()
            if key in ("ce_loss", "kd_loss") or key.startswith("kd_loss/")} if logged else {}


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
    weights_dir = save_final_weights(FinalWeights(model, tokenizer, state_dict, initial_adapter, base), run_dir, config)
    steps, report = trainer.state.global_step, outcome.report
    write_model_card(run_dir, config, steps, report, outcome.final_metrics, outcome.comparison)
    write_run_report(run_dir, outcome.final_metrics, run_settings(config, steps, report), outcome.comparison,
                     outcome.samples)
    mark_finished(run_dir, trainer.state.global_step)
    return weights_dir
