"""Load tokenizers and pretrained models (the student, any pretrained model): dtype, quantization, safetensors
only unless pickle is allowed. The frozen teacher is loaded by teacher/loading.py on top of these."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

from ..data.tokenize import ensure_chat_template, set_chat_template
from ..errors import ConfigError
from ..in_memory import is_in_memory, model_in_memory, refuse_unregistered_model, tokenizer_in_memory
from ..runtime.model_dir import check_model_files
from .class_head import ClassHead

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def resolve_dtype(name: str | None) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU unless a dtype is named."""
    if name is None or name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}'; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_model_path(path: str, role: str) -> None:
    """A missing local-looking path is named at once instead of being tried as a hub id (retries, then a
    traceback). Hub ids are "org/name"; a path whose first folder exists here is local."""
    refuse_unregistered_model(path, role)
    if model_in_memory(path) is not None or os.path.exists(os.path.expanduser(path)):
        return
    first = path.split("/", 1)[0]
    looks_local = (path.startswith((".", "/", "~")) or path.count("/") > 1
                   or ("/" in path and os.path.isdir(first)))
    if looks_local:
        raise ConfigError(f"{role} model path {path} does not exist")
    if _hub_offline() and not _in_hub_cache(path):
        raise ConfigError(f"{role} model {path} is not a local path, and the hub is offline (HF_HUB_OFFLINE) with no "
                          "copy of it in the hub cache")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repository id either
        return False


def load_tokenizer(path: str, trust_remote_code: bool = False, role: str = "student"):
    given = tokenizer_in_memory(path)
    if given is not None:
        return given
    if is_in_memory(path):
        raise ConfigError(f"the {role} model was given in memory without its tokenizer: give that too "
                          "(processing_class= for the student, teacher_processing_class= for the teacher)")
    check_model_path(path, role)
    check_model_files(path, role)  # before transformers' own message about a missing tokenizer (misleading here)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_student_tokenizer(model_args, task: str = "causal_lm"):
    """The student's tokenizer, the one the data is tokenised with: a pad token (EOS if it has none) and, for
    causal_lm, a chat template (llm-neo's fallback if it has none)."""
    return load_reading_tokenizer(model_args.student_model, model_args.trust_remote_code, "student", task)


def load_reading_tokenizer(path: str, trust_remote_code: bool = False, role: str = "student",
                           task: str = "causal_lm", chat_template: str | None = None):
    """A tokenizer that renders and pads rows itself (the student's, or a teacher's own across tokenizers): a pad
    token (EOS if it has none) and, for causal_lm, a chat template (``chat_template`` if given: 'plain' or a
    Jinja file; else its own, else llm-neo's fallback)."""
    tokenizer = load_tokenizer(path, trust_remote_code, role)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        set_chat_template(tokenizer, chat_template)
    elif task == "causal_lm" and ensure_chat_template(tokenizer):
        logger.warning("the %s tokenizer has no chat template: using llm-neo's fallback template", role)
    return tokenizer


def check_quantization(model_args) -> None:
    """Quantized loading needs CUDA and bitsandbytes: say so before any data or model is loaded."""
    requested = [f"--{role}_quantization {kind}" for role, kind in
                 (("student", model_args.student_quantization), ("teacher", model_args.teacher_quantization))
                 if kind != "none"]
    if not requested:
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"{' and '.join(requested)} needs a CUDA GPU (bitsandbytes quantization); "
                          "this machine has none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{' and '.join(requested)} needs bitsandbytes: pip install bitsandbytes")


def quantization_config(kind: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def is_quantized(model) -> bool:
    return getattr(model, "hf_quantizer", None) is not None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _check_weight_format(path: str, role: str, allow_pickle: bool) -> None:
    """Pickle weights can run code when loaded: a local model with only those is refused unless allowed."""
    local = os.path.expanduser(path)
    if allow_pickle or not os.path.isdir(local):
        return
    files = os.listdir(local)
    pickles = sorted(name for name in files if name.endswith(PICKLE_SUFFIXES))
    if pickles and not any(name.endswith(".safetensors") for name in files):
        raise ConfigError(f"{role} model {path} holds only pickle weights ({', '.join(pickles)}), which can run code "
                          "when loaded: convert them to safetensors, or pass --allow_pickle if you trust their source")


@dataclass(frozen=True)
class LoadOptions:
    """How a model loads: dtype (None: bf16 on GPU, fp32 on CPU), attention, remote code, quantization, pickles."""

    dtype: str | None = None
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    quantization: str = "none"
    allow_pickle: bool = False

    @classmethod
    def of(cls, model_args, role: str = "student", quantized: bool = True) -> LoadOptions:
        """The run's options for the student or the teacher (its own dtype and quantization; ``quantized=False``
        ignores the quantization)."""
        dtype, quantization = ((model_args.teacher_dtype, model_args.teacher_quantization) if role == "teacher"
                               else (model_args.dtype, model_args.student_quantization))
        return cls(dtype, model_args.attn_implementation, model_args.trust_remote_code,
                   quantization if quantized else "none", model_args.allow_pickle)


def load_pretrained_model(path: str, role: str, options: LoadOptions = LoadOptions(), head_kwargs: dict | None = None):
    """The model at ``path``: a causal LM, or with ``head_kwargs`` (ClassHead.model_kwargs) a sequence classifier
    whose head is read from the checkpoint when it has one and newly initialised otherwise (see check_class_head).
    A model given in memory for this run (in_memory.py) is handed back as it is."""
    given = model_in_memory(path)
    if given is not None:
        given.newly_initialized = []
        return given
    check_model_path(path, role)
    check_model_files(path, role)
    _check_weight_format(path, role, options.allow_pickle)
    torch_dtype = resolve_dtype(options.dtype)
    quantized = quantization_config(options.quantization, torch_dtype)
    placement = {"device_map": {"": torch.cuda.current_device()}} if quantized is not None else {}
    auto_class = AutoModelForCausalLM if head_kwargs is None else AutoModelForSequenceClassification
    model, loading = auto_class.from_pretrained(
        path,
        dtype=torch_dtype,
        attn_implementation=options.attn_implementation,
        trust_remote_code=options.trust_remote_code,
        quantization_config=quantized,
        use_safetensors=None if options.allow_pickle else True,
        output_loading_info=True,
        **placement,
        **(head_kwargs or {}),
    )
    model.newly_initialized = sorted(loading.get("missing_keys") or [])
    return model


def load_student(model_args, head: ClassHead | None = None):
    """The student; with ``head`` a sequence classifier whose head trains with it (new unless the checkpoint has one)."""
    student = load_pretrained_model(model_args.student_model, "student", LoadOptions.of(model_args),
                                    head.model_kwargs() if head is not None else None)
    student.config.use_cache = False
    return student
