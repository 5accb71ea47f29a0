"""Run settings: dataclasses with a one-line help per field, read from YAML and overridden by CLI flags."""

from __future__ import annotations

import dataclasses
import difflib
import glob
import json
import os
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from .in_memory import register_rows
from .errors import ConfigError
from .methods import METHODS
from .recipes import RECIPE_HELP, RECIPES
from .teachers import absolute_members, parse_teachers, teachers_checks

MIN_ROLLOUT_TEMPERATURE = 1e-3  # the smallest sampling temperature taken (0 is greedy): below it logits / T overflow


@dataclass(frozen=True)
class Range:
    """The values an option takes: from ``low`` to ``high`` (None: unbounded), each end included or not; ``why``
    ends the refusal."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def holds(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE, AT_LEAST_ONE, NON_NEGATIVE = Range(0, low_open=True), Range(1), Range(0)
FRACTION, PROPER_FRACTION = Range(0, 1), Range(0, 1, high_open=True)  # [0, 1] and [0, 1)


class _Metadata(Mapping):
    """A field's metadata: its help, and the range declared with it under ``valid``. HfArgumentParser passes every
    key it iterates to argparse's add_argument, which knows no ``valid``: the range is readable by key only."""

    def __init__(self, help_text: str, valid: Range | None):
        self._items, self._valid = {"help": help_text}, valid

    def __getitem__(self, key):
        return self._valid if key == "valid" else self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def _help(text: str, default=None, valid: Range | None = None, **kwargs):
    """A field with its one-line help and, for a number, the range ``validate`` checks it against (None skipped)."""
    return field(default=default, metadata=_Metadata(text, valid), **kwargs)


def declared_ranges(section) -> list[tuple[str, Range]]:
    """The ranges declared with a section's fields (and, for the training section, transformers' fields it uses)."""
    declared = [(item.name, item.metadata["valid"]) for item in dataclasses.fields(section)
                if item.metadata.get("valid") is not None]
    return declared + [(name, rule) for name, rule in TRAINER_RANGES.items() if hasattr(section, name)]


@dataclass
class ModelArguments:
    _argument_group_name = "models"  # the section of `distill --help` (HfArgumentParser)

    student_model: str | None = _help("Path or hub id of the student model (the model that learns).")
    teacher_model: str | None = _help("Path or hub id of the frozen teacher; required by the kd and neo methods.")
    dtype: str | None = _help("Weights dtype for both models: bfloat16, float16 or float32; default bf16 on GPU, fp32 on CPU.")
    teacher_dtype: str | None = _help("Teacher weights dtype if it differs from --dtype (the teacher keeps its own dtype).")
    attn_implementation: str = _help("Attention implementation: sdpa, eager, flash_attention_2, ...", "sdpa")
    trust_remote_code: bool = _help("Allow model repositories to run their own Python code (off: only trust what you read).", False)
    allow_pickle: bool = _help(
        "Allow loading pickle weight files (.bin/.pt), which can run code when loaded; off: safetensors only.", False)
    student_quantization: Literal["none", "nf4", "int8"] = _help(
        "Load the student quantized with bitsandbytes (QLoRA; lora/neo only; needs a CUDA GPU).", "none"
    )
    teacher_chat_template: str | None = _help(
        "With --cross_tokenizer: the chat template the teacher reads conversations through, a Jinja file or 'plain' "
        "(Question:/Answer: prose, for base models); default its own, else llm-neo's fallback template.")
    teacher_quantization: Literal["none", "nf4", "int8"] = _help(
        "Load the teacher quantized with bitsandbytes (needs a CUDA GPU); its fidelity to the unquantized teacher is logged.",
        "none",
    )


@dataclass
class DataArguments:
    _argument_group_name = "data"

    task: Literal["causal_lm", "classification"] = _help(
        "causal_lm: learn the answers token by token; classification: one label per text "
        "(AutoModelForSequenceClassification, KD on the class logits).", "causal_lm")
    class_names: str | None = _help(
        "Classification: class names in id order, comma-separated; default the sorted distinct labels of the "
        "training rows (integer labels are ids).")
    dataset: str | None = _help("Local json/jsonl/parquet/csv file(s) (comma-separated, globs allowed) or a hub dataset id.")
    dataset_config: str | None = _help("Subset (config) name of a hub dataset.")
    dataset_split: str = _help("Split to train on.", "train")
    data_format: Literal["auto", "sharegpt", "openai", "prompt_completion", "prompt", "text", "classification"] = _help(
        "Row format; auto detects it from the columns (conversations, messages, prompt+completion, prompt alone "
        "(on-policy steps only), text; text+label with --task classification).", "auto"
    )
    max_samples: int | None = _help("Train on a random subset of this many rows (drawn with --seed).", valid=AT_LEAST_ONE)
    max_length: int = _help("Truncate every tokenized row to this many tokens.", 512, valid=Range(1, low_open=True))
    skip_bad_rows: bool = _help("Skip and count unusable rows instead of stopping at the first one.", False)
    packing: bool = _help(
        "Pack each micro-batch into one row without padding (exact: attention and labels stay within each row).",
        False)
    eval_split: str | None = _help(
        "Held-out rows for evaluation: a split name of --dataset (hub or dataset folder) or local file(s).")
    eval_ratio: float = _help("Hold out this fraction of the training rows (seeded) for evaluation instead.", 0.0, valid=PROPER_FRACTION)


@dataclass
class AdapterArguments:
    _argument_group_name = "adapter"

    adapter: Literal["lora", "moslora", "dora", "rslora", "pissa", "olora"] = _help(
        "Adapter kind: lora (paper), moslora (r x r mixer between A and B), dora, rslora (alpha / sqrt(r)), "
        "pissa / olora (initialised from the base weights; saved as a plain LoRA of rank 2r for the original base).",
        "lora",
    )
    mixer_init: Literal["kaiming", "orthogonal"] = _help("MoSLoRA mixer initialisation.", "kaiming")
    peft_options: str | None = _help(
        "Further peft.LoraConfig options as a JSON object (a mapping in YAML), e.g. {\"init_lora_weights\": \"pissa_niter_4\"}."
    )
    lora_r: int = _help("LoRA rank r (paper: 128; larger ranks want lower learning rates).", 128, valid=POSITIVE)
    lora_alpha: float | None = _help("LoRA scaling numerator; default 2 * lora_r as in the paper.",
        valid=Range(0, low_open=True, why=": the adapter's scaling alpha / r would make it do nothing"))
    lora_dropout: float = _help("Dropout on the LoRA branch input.", 0.0, valid=PROPER_FRACTION)
    target_modules: str = _help(
        "Linear layers that get adapters: all-linear (every linear except lm_head), attention (q,k,v,o), "
        "qkv, or a comma-separated list of module names.",
        "all-linear",
    )

    def scaling_alpha(self) -> float:
        """lora_alpha, or the paper's default 2 * lora_r when it is not set."""
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_r


@dataclass
class DistillArguments:
    method: Literal["sft", "lora", "kd", "neo"] = _help(
        "sft: full fine-tune, CE; lora: adapter, CE; kd: full fine-tune, CE+KD; neo: adapter, CE+KD.", "neo"
    )
    alpha: float = _help("Mixing weight: loss = alpha * CE + (1 - alpha) * T^2 * D, D = KL(teacher || student) by default.", 0.5,
        valid=FRACTION)
    temperature: float = _help("Distillation temperature T applied to both models' logits.", 1.0, valid=POSITIVE)
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl", "akl"] = _help(
        "KD divergence: forward_kl (paper), reverse_kl, jsd (generalized, --jsd_beta), tvd, skew_forward_kl / "
        "skew_reverse_kl (DistiLLM, --skew_lambda), akl (adaptive KL, --akl_mu).",
        "forward_kl",
    )
    jsd_beta: float = _help("Generalized JSD weight beta: 0 is forward KL, 1 is reverse KL.", 0.5, valid=FRACTION)
    skew_lambda: float = _help("Skew KL mixing weight lambda: KL(p || lambda * p + (1 - lambda) * q).", 0.1, valid=PROPER_FRACTION)
    akl_mu: float = _help(
        "Adaptive KL head threshold mu: the head is the top teacher tokens whose cumulative mass stays <= mu (always "
        "at least the top-1 token); the token that crosses mu is tail, as in the AKL authors' code.", 0.5,
        valid=Range(0, 1, low_open=True, high_open=True))
    loss_impl: Literal["fused", "naive", "liger"] = _help(
        "Loss implementation: fused (chunked head, no B*T*V logits), naive (full logits from both models), "
        "liger (Liger-Kernel's chunked JSD loss, if installed; forward_kl, reverse_kl, jsd).",
        "fused",
    )
    teacher_cache: str | None = _help(
        "Read the teacher's top-k distributions from this `llm-neo cache-teacher` directory instead of running the teacher."
    )
    teacher_server: str | None = _help(
        "Distil from a teacher served by vLLM (or another OpenAI-compatible server with prompt_logprobs) at this base "
        "URL, e.g. http://127.0.0.1:8000/v1: its top-k per answer token are fetched per batch (docs/served-teacher.md).")
    teacher_server_model: str | None = _help("With --teacher_server: the served model name; default the server's only model.")
    teacher_server_api_key_env: str | None = _help(
        "With --teacher_server: the environment variable holding the server's API key (sent as a bearer token).")
    teacher_server_timeout: float = _help(
        "With --teacher_server: seconds one whole answer may take (connecting, sending, reading it all) before "
        "trying again.", 120.0, valid=POSITIVE)
    teacher_server_retries: int = _help(
        "With --teacher_server: further tries of a request that failed (backoff 1, 2, 4... s); then the run saves "
        "its last step and stops with the resume command.", 4, valid=NON_NEGATIVE)
    teacher_top_k: int = _help(
        "With --teacher_server: teacher tokens per answer position (at most the server's --max-logprobs).", 64, valid=AT_LEAST_ONE)
    teachers: str | None = _help(
        "Several teachers (docs/multi-teacher.md): in YAML a list of {name, and one of model, server or cache, with "
        "that teacher's own options}; on the command line NAME=PATH_OR_URL,NAME=... (a URL is served, a cache-teacher "
        "directory is a cache, anything else a model). Replaces teacher_model / teacher_server / teacher_cache.")
    teacher_routing: Literal["column", "mixture"] = _help(
        "With --teachers: column (each row's --teacher_column names its teacher; no value: CE only) or mixture (every "
        "row's KD term is the --teacher_weights sum of each teacher's).", "column")
    teacher_column: str = _help("With --teachers and teacher_routing column: the data column naming each row's teacher.",
                                "teacher")
    teacher_weights: str | None = _help(
        "With teacher_routing mixture: one weight per teacher in --teachers order, >= 0 and summing to 1, e.g. 0.7,0.3 "
        "(default: equal weights).")
    teacher_offload: bool = _help(
        "With --teachers on a GPU: keep every loaded teacher on the CPU except while it scores a batch (less GPU memory, "
        "a host-to-device copy of each teacher per micro-batch).", False)
    cache_tail: Literal["bucket", "renormalize"] = _help(
        "With --teacher_cache or --teacher_server: bucket compares the top-k tokens plus one bucket for the rest of the vocabulary; "
        "renormalize compares the top-k tokens only, renormalised.",
        "bucket",
    )
    cross_tokenizer: Literal["exact", "uld", "hybrid"] | None = _help(
        "Distil from a teacher whose tokenizer differs from the student's, comparing next-token distributions at the "
        "answers' aligned boundaries: exact (tokens with identical bytes one to one, the rest as one bucket; any "
        "--divergence), uld (sorted-probability L1, Boizard et al. 2024) or hybrid (exact plus ULD on the unmapped "
        "remainder).")
    nonfinite_policy: Literal["stop", "skip"] = _help(
        "On a NaN/inf loss or gradient: stop (save a checkpoint of the last good step and stop, naming the step and "
        "its rows) or skip (drop that update, count it, stop after --max_bad_steps).", "stop")
    max_bad_steps: int = _help("With --nonfinite_policy skip: how many skipped updates are tolerated.", 10, valid=NON_NEGATIVE)
    auto_micro_batch: bool = _help(
        "Probe the largest micro-batch that fits and use it, adjusting gradient accumulation so that each optimizer "
        "step sees the same rows.", False)
    auto_micro_batch_budget_gib: float | None = _help(
        "Memory budget of --auto_micro_batch; default 90%% of the GPU, or of the available memory on CPU.")
    kd_chunk_size: int = _help("Answer tokens per chunk when computing the loss (bounds the fp32 logits memory).", 1024, valid=POSITIVE)
    min_lr_ratio: float = _help("Floor of the cosine schedule as a fraction of the peak learning rate (0: decay to 0).", 0.0,
        valid=PROPER_FRACTION)
    on_policy_fraction: float = _help(
        "Share of optimizer steps trained on the student's own answers to the rows' prompts, scored by the teacher "
        "(0: none); step k is on-policy iff floor((k+1)L) - floor(kL) = 1.", 0.0, valid=FRACTION)
    on_policy_loss: Literal["full", "sampled"] = _help(
        "On-policy steps: full (T^2 * --divergence at every generated token) or sampled (per-token reverse-KL "
        "estimator log p_s(y) - log p_t(y) on the sampled tokens, score-function gradient, T = 1).", "full")
    rollout_max_new_tokens: int = _help("On-policy steps: the student's answer stops at this many new tokens.", 128, valid=AT_LEAST_ONE)
    rollout_temperature: float = _help("On-policy steps: the student's sampling temperature (0: greedy).", 1.0)
    rollout_top_p: float = _help("On-policy steps: nucleus sampling mass (1: the whole distribution).", 1.0,
        valid=Range(0, 1, low_open=True))
    rollout_server: str | None = _help(
        "Generate on-policy rollouts on a vLLM server of the student's base at this OpenAI-compatible base URL, "
        "e.g. http://127.0.0.1:8001/v1, started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True: the "
        "current adapter is loaded there before each on-policy step (docs/on-policy.md).")
    rollout_server_model: str | None = _help(
        "With --rollout_server: the served name of the student's base; default the server's only base model.")
    rollout_server_api_key_env: str | None = _help(
        "With --rollout_server: the environment variable holding the server's API key (sent as a bearer token).")
    rollout_server_timeout: float = _help(
        "With --rollout_server: seconds one whole answer may take before trying again.", 300.0, valid=POSITIVE)
    rollout_server_retries: int = _help(
        "With --rollout_server: further tries of a request that failed (backoff 1, 2, 4... s); then the run saves "
        "its last step and stops with the resume command.", 4, valid=NON_NEGATIVE)
    rollout_adapter_dir: str | None = _help(
        "With --rollout_server: where the adapter is written for the server to load (default RUN/rollout-adapter); "
        "a server on another machine needs it on a shared filesystem, at the same path.")
    rollout_sync_steps: int = _help(
        "With --rollout_server: on-policy steps between adapter syncs (1: every step, rollouts from the exact "
        "student; N: up to N-1 steps stale, logged as rollout_staleness).", 1, valid=AT_LEAST_ONE)


@dataclass
class NeoTrainingArguments(TrainingArguments, DistillArguments):
    """transformers' TrainingArguments plus the distillation settings (DistillArguments' fields), as TRL's trainer
    configs do: TokenDistillTrainer reads everything it needs from ``self.args``."""

    _argument_group_name = "distillation and training (with transformers' TrainingArguments)"

    output_dir: str | None = _help("Run directory: config, metrics.jsonl, adapter or weights, model card, checkpoints.", "runs/neo")
    overwrite_output_dir: bool = _help(
        "Replace the run already in --output_dir (its old contents are removed first); without it such a directory "
        "is refused.", False)
    learning_rate: float | None = _help("Peak learning rate; default 2e-4 for adapter methods, 2e-5 for full fine-tuning.",
        valid=Range(0, low_open=True, why=": a run with it would train nothing"))
    lr_scheduler_type: str = _help("Learning-rate schedule (cosine with warmup as in the paper).", "cosine")
    warmup_steps: float = _help("Warmup steps; a float in [0, 1) is a fraction of all steps.", 0.1)
    logging_steps: float = _help("Log (and write metrics.jsonl) every this many optimizer steps.", 10)
    save_strategy: str = _help("When to save checkpoints: no, steps or epoch.", "no")
    remove_unused_columns: bool = _help("Kept off: the data pipeline already yields only model inputs.", False)


CONFIG_CLASSES = (ModelArguments, DataArguments, AdapterArguments, NeoTrainingArguments)
DISTILL_FIELDS = tuple(f.name for f in dataclasses.fields(DistillArguments))


# The ranges of transformers' TrainingArguments fields that llm-neo checks before a run.
TRAINER_RANGES = {"per_device_train_batch_size": AT_LEAST_ONE, "gradient_accumulation_steps": AT_LEAST_ONE}


@dataclass
class RunConfig:
    model: ModelArguments
    data: DataArguments
    adapter: AdapterArguments
    training: NeoTrainingArguments

    @classmethod
    def from_options(cls, config: str | Path | None = None, recipe: str | None = None, **options) -> RunConfig:
        """The run's configuration from keyword arguments named as the command line's options (``lora_r=8``,
        ``output_dir="runs/x"``, any transformers TrainingArguments field), over a YAML file (``config``, flat or a
        run's config.yaml) over a recipe, as ``llm-neo distill --recipe R --config F --option value`` builds it:
        the same defaults, checks and messages."""
        merged = presets(_known_recipe(recipe) if recipe else None, config)
        unknown = sorted(set(options) - option_names())
        if unknown:
            raise ConfigError(_unknown_message(unknown, "RunConfig.from_options"))
        merged.update(options)
        if isinstance(merged.get("teachers"), list):  # a YAML list or Python objects: its text, as the flag gives it
            merged["teachers"] = json.dumps(merged["teachers"])
        for name, role in (("dataset", "train"), ("eval_split", "eval")):  # rows given as objects, not paths
            if merged.get(name) is not None and not isinstance(merged[name], str):
                merged[name] = register_rows(merged[name], role)
        sections = []
        for section in CONFIG_CLASSES:
            names = {item.name for item in dataclasses.fields(section) if item.init}
            values = {name: value for name, value in merged.items() if name in names}
            _check_types(section, values)
            try:
                sections.append(section(**values))
            except ValueError as error:  # TrainingArguments validates itself (e.g. bf16 without a GPU)
                raise ConfigError(str(error)) from error
        run_config = cls(*sections)
        resolve_defaults(run_config)
        validate(run_config)
        return run_config

    @classmethod
    def from_yaml(cls, path: str | Path, **options) -> RunConfig:
        """A YAML file's configuration (flat, or a run's config.yaml), with ``options`` over it."""
        return cls.from_options(config=path, **options)

    def to_yaml(self, path: str | Path) -> Path:
        """Write the configuration as a run's config.yaml (``from_yaml`` reads it back)."""
        path = Path(path)
        path.write_text(yaml.safe_dump(self.resolved(), sort_keys=False), encoding="utf-8")
        return path

    def resolved(self) -> dict:
        """The sections as config.yaml holds them, in JSON types (a value of another type as its text)."""
        return json.loads(json.dumps(self.to_dict(), default=str))

    def to_dict(self) -> dict:
        """Sections as in a run's config.yaml: model, data, adapter, distill, training."""
        return {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "adapter": dataclasses.asdict(self.adapter),
            **training_sections(self.training),
        }


def training_sections(training: NeoTrainingArguments) -> dict:
    """A NeoTrainingArguments' options as config.yaml's distill and training sections (transformers' fields as
    its to_dict writes them)."""
    written = training.to_dict()
    return {"distill": {name: getattr(training, name) for name in DISTILL_FIELDS},
            "training": {f.name: written[f.name] for f in dataclasses.fields(training)
                         if f.init and f.name not in DISTILL_FIELDS and not f.name.startswith("_")}}


def flat_options(sections: dict) -> dict:
    """Sections' options as one mapping of option name to value (names are unique across sections)."""
    return {key: value for section in sections.values() for key, value in section.items()}


def presets(recipe: str | None, config: str | Path | None) -> dict:
    """The options a recipe sets, with a YAML file's over them: what flags or keywords then override."""
    options = dict(RECIPES[recipe]) if recipe else {}
    options.update(load_yaml(config) if config else {})
    return options


def _known_recipe(recipe: str) -> str:
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; expected one of {sorted(RECIPES)}")
    return recipe


def _check_types(section, values: dict) -> None:
    """Keyword values of the type each field declares (the command line converts its strings; Python hands over
    objects): an int where a float is declared is taken, a string where a number is declared is not."""
    hints = typing.get_type_hints(section)
    for name, value in values.items():
        expected = hints.get(name)
        if value is None or expected is None:
            continue
        kinds = [kind for kind in typing.get_args(expected) if kind is not type(None)] \
            if typing.get_origin(expected) in (typing.Union, types.UnionType) else [expected]
        if any(_is_of(value, kind) for kind in kinds):
            continue
        choices = [choice for kind in kinds if typing.get_origin(kind) is typing.Literal for choice in typing.get_args(kind)]
        wanted = f"one of {choices}" if choices else " or ".join(TYPE_NAMES.get(kind, str(kind)) for kind in kinds)
        raise ConfigError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__})")


TYPE_NAMES = {float: "a number", int: "an integer", bool: "True or False", str: "a string"}


def _is_of(value, kind) -> bool:
    if typing.get_origin(kind) is typing.Literal:
        return value in typing.get_args(kind)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in (str, bool):
        return isinstance(value, kind)
    return True  # dicts, lists, enums and unions of them: transformers checks its own fields


def build_parser(prog: str = "llm-neo distill") -> HfArgumentParser:
    parser = HfArgumentParser(CONFIG_CLASSES, prog=prog, allow_abbrev=False,  # a typo must not pick an option
                              usage="%(prog)s [--config FILE.yaml] [--recipe NAME] [--OPTION VALUE ...]")
    parser.add_argument("--config", default=None, help="YAML file with any of these options; flags override it.")
    parser.add_argument("--recipe", default=None, choices=sorted(RECIPES), help=RECIPE_HELP)
    return parser


def option_names() -> set[str]:
    return {f.name for cls in CONFIG_CLASSES for f in dataclasses.fields(cls) if f.init}


def _flatten_yaml(data: dict, source: str) -> dict:
    """Accept flat keys or the sections written in a run's config.yaml (model/data/adapter/distill/training)."""
    flat = {}
    for key, value in data.items():
        if key in {"model", "data", "adapter", "distill", "training"} and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(set(flat) - option_names())
    if unknown:
        raise ConfigError(_unknown_message(unknown, source))
    return flat


def _unknown_message(unknown: list[str], source: str) -> str:
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(option_names()), n=1)
        parts.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return f"{source}: unknown option {', '.join(parts)}"


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:  # includes python/object tags, which safe_load refuses to construct
        raise ConfigError(f"{path} is not valid YAML for llm-neo ({' '.join(str(error).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    return _flatten_yaml(data, str(path))


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """Parse `--recipe NAME`, `--config file.yaml` and flags (each overriding the one before), then fill
    method-dependent defaults and validate."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    known = parser.parse_known_args(argv)[0]
    parser.set_defaults(**presets(known.recipe, known.config))
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except ValueError as error:  # TrainingArguments validates itself (e.g. bf16 without a GPU)
        raise ConfigError(str(error)) from error
    dataclass_values = parsed[: len(CONFIG_CLASSES)]  # the rest is the namespace holding --config and --recipe
    unknown = [a[2:].split("=")[0] for a in remaining if a.startswith("--")]
    if unknown:
        raise ConfigError(_unknown_message(unknown, "command line"))
    if remaining:
        raise ConfigError(f"command line: unexpected argument(s) {remaining}; options are written --name value")
    config = RunConfig(*dataclass_values)
    resolve_defaults(config)
    validate(config)
    return config


def resolve_defaults(config: RunConfig) -> None:
    preset = METHODS[config.training.method]
    if config.training.learning_rate is None:
        config.training.learning_rate = 2e-4 if preset.uses_adapter else 2e-5
    config.adapter.lora_alpha = config.adapter.scaling_alpha()
    if config.training.min_lr_ratio > 0 and config.training.lr_scheduler_type in ("cosine", "cosine_with_min_lr"):
        config.training.lr_scheduler_type = "cosine_with_min_lr"
        config.training.lr_scheduler_kwargs = {"min_lr_rate": config.training.min_lr_ratio}
    if config.model.teacher_dtype is None:
        config.model.teacher_dtype = config.model.dtype
    if not torch.accelerator.is_available():  # pinned host memory only speeds copies to an accelerator
        config.training.dataloader_pin_memory = False
    absolute_local_paths(config)


def absolute_local_paths(config: RunConfig) -> None:
    """Local paths (models, data files, a cache, a template file) made absolute, so that the run's config.yaml
    names them wherever `eval`, `merge` or `generate` of the run are run from; hub ids are left as they are."""
    model, data, training = config.model, config.data, config.training
    model.student_model, model.teacher_model = _absolute(model.student_model), _absolute(model.teacher_model)
    model.teacher_chat_template = _absolute(model.teacher_chat_template)
    training.teacher_cache = _absolute(training.teacher_cache)
    training.teachers = absolute_members(parse_teachers(training.teachers)) or None
    if data.dataset:
        data.dataset = ",".join(_absolute(part.strip()) if part.strip() else part for part in data.dataset.split(","))
    if data.eval_split:  # a split name stays a name; only files here are paths
        data.eval_split = ",".join(_absolute(part.strip()) if os.path.isfile(part.strip()) or glob.glob(part.strip())
                                   else part for part in data.eval_split.split(","))


def _absolute(value: str | None) -> str | None:
    """``value`` as an absolute path when it names something here (a file, folder or glob matching files)."""
    if not value:
        return value
    expanded = os.path.expanduser(value)
    return os.path.abspath(expanded) if os.path.exists(expanded) or glob.glob(expanded) else value


def validate(config: RunConfig) -> None:
    """Every rule, in order: the first broken one is the error (one line naming the option, value and fix)."""
    checks = (_value_checks(config) + teachers_checks(config, validate) + _method_checks(config)
              + _classification_checks(config)
              + _cross_tokenizer_checks(config) + _served_teacher_checks(config) + _on_policy_checks(config)
              + _rollout_server_checks(config) + _liger_checks(config))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _value_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """The required options, each option's declared range, and the step count."""
    sections = (config.model, config.data, config.adapter, config.training)
    return [
        (config.model.student_model is not None, "student_model is required"),
        (config.data.dataset is not None, "dataset is required"),
        *[(rule.holds(value), f"{name} must be {rule}, got {value}{rule.why}") for section in sections
          for name, rule in declared_ranges(section) if (value := getattr(section, name)) is not None],
        (config.training.max_steps != 0, "max_steps 0 trains nothing: give a number of steps > 0, or -1 (the default) "
                                         "to train for num_train_epochs"),
        (config.training.max_steps >= -1, f"max_steps {config.training.max_steps}: give a number of steps > 0, or -1 "
                                          "(not set: train for num_train_epochs)"),
        (config.training.max_steps > 0 or config.training.num_train_epochs > 0,
         f"nothing to train: max_steps {config.training.max_steps} and num_train_epochs "
         f"{config.training.num_train_epochs}; give max_steps > 0 or num_train_epochs > 0"),
        (not (config.data.eval_ratio > 0 and config.data.eval_split), "give eval_split or eval_ratio, not both"),
    ]


def _method_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """What the method needs: an adapter for a quantized student, a teacher for kd and neo."""
    preset, training = METHODS[config.training.method], config.training
    has_teacher = (config.model.teacher_model is not None or training.teacher_cache is not None
                   or training.teacher_server is not None or bool(training.teachers))
    return [(config.model.student_quantization == "none" or preset.uses_adapter,
             f"a quantized student (--student_quantization {config.model.student_quantization}) trains only through "
             f"an adapter: use method lora or neo, not {training.method}"),
            (has_teacher or not preset.uses_teacher,
             f"method {training.method} needs teacher_model (or a teacher_cache, teacher_server or teachers)"),
            (not training.teachers or preset.uses_teacher, f"teachers is for the kd and neo methods, not {training.method}"),
            (training.teacher_cache is None or preset.uses_teacher,
             f"teacher_cache is for the kd and neo methods, not {training.method}")]


def _served_teacher_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """--teacher_server is the run's one teacher, read on the student's own tokens as top-k rows."""
    training = config.training
    if training.teacher_server is None:
        return []
    return [(METHODS[training.method].uses_teacher, f"teacher_server is for the kd and neo methods, not {training.method}"),
            (config.model.teacher_model is None and training.teacher_cache is None,
             "give one teacher: teacher_server, teacher_model or teacher_cache"),
            (training.cross_tokenizer is None, "a served teacher must share the student's tokenizer: distil across "
                                               "tokenizers with a local --teacher_model and --cross_tokenizer"),
            (config.data.task == "causal_lm", "teacher_server is for --task causal_lm"),
            (training.dataloader_num_workers == 0, "teacher_server fetches the next batches' teacher rows from the "
                                                   "training process: leave dataloader_num_workers at 0")]


def _on_policy_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """On-policy steps: the student answers the rows' prompts and a teacher that can read new tokens scores them."""
    training = config.training
    if training.on_policy_fraction == 0.0:
        return []
    unsupported = [("a teacher_cache (it holds the dataset's answers only)", training.teacher_cache is not None),
                   ("packing", config.data.packing)]
    return [(METHODS[training.method].uses_teacher, f"on_policy_fraction is for the kd and neo methods (a teacher "
                                                   f"scores the answers), not {training.method}"),
            (config.data.task == "causal_lm", "on_policy_fraction is for --task causal_lm"),
            *[(not used, f"on_policy_fraction does not work with {name}") for name, used in unsupported],
            (training.rollout_temperature == 0 or training.rollout_temperature >= MIN_ROLLOUT_TEMPERATURE,
             f"rollout_temperature must be 0 (greedy) or >= {MIN_ROLLOUT_TEMPERATURE:g} (below it logits / T "
             f"overflow and sampling breaks), got {training.rollout_temperature:g}"),
            (training.on_policy_loss == "full" or training.temperature == 1.0,
             f"on_policy_loss sampled is the reverse-KL estimator at T = 1: --temperature {training.temperature} "
             "is refused with it")]


def _rollout_server_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """A rollout server generates with the student's adapter, synced to it: one adapter vLLM can serve, one
    process sending it."""
    training = config.training
    if training.rollout_server is None:
        return []
    dora = config.adapter.adapter == "dora" or bool(_peft_option(config.adapter.peft_options, "use_dora"))
    return [(training.on_policy_fraction > 0, "rollout_server generates on-policy rollouts: set --on_policy_fraction"),
            (METHODS[training.method].uses_adapter, f"rollout_server loads the student's adapter, and method "
                                                   f"{training.method} trains every weight (there is no adapter to "
                                                   "send): use --method neo"),
            (not dora, "rollout_server: vLLM serves no DoRA adapter (its magnitude vector rescales the base "
                       "weights): choose another --adapter, or generate in the trainer (leave --rollout_server out)")]


def _peft_option(options, key: str):
    """One key of --peft_options (JSON text or a mapping); unreadable options are refused where they are parsed."""
    try:
        options = json.loads(options) if isinstance(options, str) else options or {}
    except ValueError:
        return None
    return options.get(key) if isinstance(options, dict) else None


def _cross_tokenizer_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """--cross_tokenizer reads the teacher (online, or a cache captured with --cross_tokenizer) at aligned
    boundaries of padded rows."""
    if config.training.cross_tokenizer is None:
        return [(config.model.teacher_chat_template is None,
                 "teacher_chat_template is for a teacher with another tokenizer: add --cross_tokenizer")]
    name = f"cross_tokenizer {config.training.cross_tokenizer}"
    return [(METHODS[config.training.method].uses_teacher, f"{name} is for the kd and neo methods, not "
                                                          f"{config.training.method}"),
            (config.data.task == "causal_lm", f"{name} is for --task causal_lm"),
            (not config.data.packing, f"{name} needs padded rows: leave --packing off"),
            (config.training.cache_tail == "bucket", f"{name} keeps the cached tail as its rest bucket: cache_tail "
                                                    "renormalize is for a cache over the student's own tokens")]


def _liger_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """Liger's chunked loss reads a loaded teacher's final hidden states on the student's own tokens, every answer
    token of a causal LM: each other source of the teacher's signal is named with the refusal."""
    if config.training.loss_impl != "liger":
        return []
    training = config.training
    others = [("a teacher_cache", training.teacher_cache is not None),
              ("a teacher_server", training.teacher_server is not None),
              (f"cross_tokenizer {training.cross_tokenizer}", training.cross_tokenizer is not None),
              ("on_policy_fraction (its KD term is computed by llm-neo)", training.on_policy_fraction > 0),
              ("--task classification", config.data.task == "classification")]
    return [(not used, f"loss_impl liger needs a loaded teacher's hidden states on the student's own tokens (it is "
                       f"for --task causal_lm), not {name}: use loss_impl fused or naive") for name, used in others]


def _classification_checks(config: RunConfig) -> list[tuple[bool, str]]:
    """Options that only mean something for token-level (causal_lm) distillation."""
    classifying = config.data.task == "classification"
    if not classifying:
        return [(config.data.data_format != "classification", "data_format classification needs --task classification")]
    unsupported = [("teacher_cache", config.training.teacher_cache is not None), ("packing", config.data.packing),
                   ("auto_micro_batch", config.training.auto_micro_batch)]
    checks = [(not used, f"{name} is for --task causal_lm; a classification run computes the teacher's class "
                         "logits online and needs none of it") for name, used in unsupported]
    checks.append((config.data.data_format in ("auto", "classification"),
                   f"--task classification reads text+label rows (data_format classification), not "
                   f"{config.data.data_format}"))
    return checks
