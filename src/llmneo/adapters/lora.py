"""The student's adapter, built with PEFT: LoRA (the paper: every linear layer except lm_head, r=128, alpha=2r) and
its family, each through PEFT's own options: DoRA, rsLoRA, PiSSA, OLoRA, and MoSLoRA through PEFT's custom layers."""

from __future__ import annotations

import dataclasses
import difflib
import json
import warnings
from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from ..errors import ConfigError
from ..methods import METHODS
from ..models.loading import is_quantized
from .moslora import register_moslora

TARGET_PRESETS = {
    "all-linear": "all-linear",  # PEFT's preset: every nn.Linear except the output layer
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qkv": ["q_proj", "k_proj", "v_proj"],
}

# The LoraConfig options each adapter kind stands for.
ADAPTER_KINDS = {
    "lora": {},
    "moslora": {},
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
}
# Initialisations that move part of the base weight into the adapter, so the trained adapter only fits the mutated
# base until it is converted (see store.py).
BASE_MUTATING_INITS = ("pissa", "olora", "corda")
# LoraConfig options that have llm-neo flags of their own.
OWN_OPTIONS = {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "target_modules": "target_modules"}


def resolve_target_modules(spec: str):
    if spec in TARGET_PRESETS:
        return TARGET_PRESETS[spec]
    return [name.strip() for name in spec.split(",") if name.strip()]


def parse_peft_options(options) -> dict:
    """``--peft_options`` (JSON text, or a mapping from YAML) checked against LoraConfig's fields."""
    if not options:
        return {}
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except json.JSONDecodeError as error:
            raise ConfigError(f"peft_options is not valid JSON ({error.msg} at character {error.pos}): {options}") from None
    if not isinstance(options, dict):
        raise ConfigError(f"peft_options must be a JSON object of LoraConfig options, got {type(options).__name__}")
    known = {field.name for field in dataclasses.fields(LoraConfig) if not field.name.startswith("_")}
    for key in options:
        if key in OWN_OPTIONS:
            raise ConfigError(f"peft_options sets '{key}': use --{OWN_OPTIONS[key]} instead")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"peft_options: LoraConfig has no option '{key}'{hint}")
    return options


# LoraConfig fields that describe where a config came from or how PEFT runs it, not the adapter a run trains.
NOT_ADAPTER_OPTIONS = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                       "revision", "inference_mode", "runtime_config"}


def adapter_options(peft_config: LoraConfig) -> dict:
    """A ``peft.LoraConfig`` as llm-neo's adapter options: r, alpha, dropout and target modules by their own names,
    every other field that differs from LoraConfig's default in ``peft_options``."""
    if not isinstance(peft_config, LoraConfig):
        raise ConfigError(f"peft_config must be a peft.LoraConfig (llm-neo trains LoRA adapters), got "
                          f"{type(peft_config).__name__}")
    default = LoraConfig()
    targets = peft_config.target_modules
    options = {"lora_r": peft_config.r, "lora_alpha": float(peft_config.lora_alpha),
               "lora_dropout": float(peft_config.lora_dropout),
               "target_modules": targets if isinstance(targets, str) or targets is None else ",".join(sorted(targets))}
    if targets is None:  # PEFT's default: the model type's usual modules; llm-neo's default names them explicitly
        options.pop("target_modules")
    extra = {field.name: getattr(peft_config, field.name) for field in dataclasses.fields(LoraConfig)
             if field.name not in NOT_ADAPTER_OPTIONS and field.name not in OWN_OPTIONS
             and getattr(peft_config, field.name) != getattr(default, field.name)}
    if extra:
        options["peft_options"] = json.dumps(extra, default=_json_value)
    return options


def _json_value(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise ConfigError(f"peft_config holds {type(value).__name__} values, which a run's config.yaml cannot record: "
                      "give that option through --peft_options as JSON")


def mutates_base(config: LoraConfig) -> bool:
    return is_base_mutating(config.init_lora_weights)


def is_base_mutating(init) -> bool:
    """Whether a LoraConfig ``init_lora_weights`` value moves part of the base into the adapter."""
    return isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS)


def lora_config(adapter_args, task_type: str = "CAUSAL_LM") -> LoraConfig:
    """The LoraConfig of ``--adapter`` with ``--peft_options`` on top; a MoSLoRA config builds MoSLoRA layers.
    ``task_type`` SEQ_CLS makes PEFT train and save the classification head in full beside the adapter."""
    options = {**ADAPTER_KINDS[adapter_args.adapter], **parse_peft_options(adapter_args.peft_options)}
    try:
        config = LoraConfig(
            r=adapter_args.lora_r,
            lora_alpha=adapter_args.scaling_alpha(),
            lora_dropout=adapter_args.lora_dropout,
            target_modules=resolve_target_modules(adapter_args.target_modules),
            bias="none",
            task_type=task_type,
            **options,
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(f"adapter {adapter_args.adapter} with peft_options {options}: {error}") from None
    if adapter_args.adapter == "moslora":
        if config.use_dora or mutates_base(config):
            raise ConfigError("moslora combines with neither DoRA nor base-mutating inits (pissa, olora, corda)")
        register_moslora(config, adapter_args.mixer_init)
    return config


PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS"}


@contextmanager
def peft_wrapping():
    """Around PEFT wrapping a model: PeftModel.__init__ (every PEFT release up to 0.21.2) reads transformers' deprecated
    ``is_gradient_checkpointing`` alias, so each wrap printed its FutureWarning although llm-neo never reads the old
    name. Only that warning, only during the wrap, stays off the console; any other still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_lora(student, adapter_args, task: str = "causal_lm"):
    """Wrap the student in a PeftModel whose only trainable parameters are the adapter's (and a classifier's head)."""
    try:
        with peft_wrapping():
            return get_peft_model(student, lora_config(adapter_args, PEFT_TASK_TYPES[task]))
    except ValueError as error:
        if "not found in the base model" not in str(error) and "Target modules" not in str(error):
            raise
        names = sorted({name.rsplit(".", 1)[-1] for name, module in student.named_modules()
                        if isinstance(module, torch.nn.Linear)})
        raise ConfigError(f"target_modules {adapter_args.target_modules!r} matches no layer of the student; its "
                          f"linear layers are named {', '.join(names)}") from None


def with_adapter(config, student):
    """The student as the run trains it: with its adapter for lora and neo (QLoRA-prepared when quantized: fp32
    norms, input gradients for checkpointing), as it is otherwise."""
    if not METHODS[config.training.method].uses_adapter:
        return student
    if is_quantized(student):
        # activation_checkpointing is the newer transformers 5 name of gradient_checkpointing (absent in 5.17)
        checkpointing = getattr(config.training, "activation_checkpointing", False) or \
            config.training.gradient_checkpointing
        student = prepare_model_for_kbit_training(student, use_gradient_checkpointing=checkpointing)
    return add_lora(student, config.adapter, config.data.task)
