"""`llm-neo generate`: what a model, a run's student or its teacher answers, greedily, through the chat template.

Metrics say how close a student is; answers say whether it talks. Prompts are single user turns rendered with the
model's own chat template (llm-neo's fallback template when it has none), as training rows are.
"""

from __future__ import annotations

from pathlib import Path

from .artifacts import load_run_config, load_run_model
from .runtime.layout import open_target
from .config import ModelArguments
from .errors import ConfigError
from .evaluation.answers import continue_greedily, prompt_ids
from .models.loading import load_pretrained_model, load_student_tokenizer


def load_for_generation(target: str, teacher: bool = False):
    """The model and tokenizer to generate with: a run's merged student (or, with ``teacher``, its teacher), or a
    model directory."""
    opened = open_target(target, hub_ids=True)
    path = opened.path
    if opened.kind != "model":  # a run, or one of its checkpoints
        config = load_run_config(opened.run_dir)
        if (config.get("data") or {}).get("task") == "classification":
            raise ConfigError(f"{path} holds a classifier: generate is for causal language models (use llm-neo eval)")
        if teacher:
            model_path = config["model"].get("teacher_model")
            if not model_path:
                raise ConfigError(f"the run in {path} has no teacher_model (a CE-only method or a teacher cache)")
            return _load_model_dir(model_path, config["model"])
        model, tokenizer = load_run_model(path, "generate")
        return model.eval(), tokenizer
    if teacher:
        raise ConfigError("--teacher needs a run directory (it names its teacher)")
    return _load_model_dir(target, {})


def _load_model_dir(path: str, model_options: dict):
    options = {key: value for key, value in model_options.items() if key in ("dtype", "attn_implementation",
                                                                               "allow_pickle", "trust_remote_code")}
    args = ModelArguments(student_model=path, **options)
    tokenizer = load_student_tokenizer(args)
    model = load_pretrained_model(path, "model", args.dtype, args.attn_implementation, args.trust_remote_code,
                                  allow_pickle=args.allow_pickle)
    return model.eval(), tokenizer


def answer_prompts(model, tokenizer, prompts: list[str], max_new_tokens: int = 128) -> list[str]:
    return [continue_greedily(model, tokenizer, prompt_ids(tokenizer, prompt), max_new_tokens) for prompt in prompts]


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """``--prompt`` or ``--prompts FILE`` (one prompt per non-empty line)."""
    if (prompt is None) == (prompts_file is None):
        raise ConfigError("give exactly one of --prompt TEXT and --prompts FILE")
    if prompt is not None:
        return [prompt]
    path = Path(prompts_file)
    if not path.is_file():
        raise ConfigError(f"prompts file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompts file {path} holds no prompts (one per line)")
    return prompts
