"""`llm-neo generate`: what a model, a run's student or its teacher answers, greedily, through the chat template.

Metrics say how close a student is; answers say whether it talks. Prompts are single user turns rendered with the
model's own chat template (llm-neo's fallback template when it has none), as training rows are.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .artifacts import load_run_config, load_run_model
from .runtime.layout import open_target
from .config import ModelArguments
from .errors import ConfigError
from .evaluation.answers import continue_greedily, prompt_ids
from .models.loading import LoadOptions, load_pretrained_model, load_reading_tokenizer
from .rollouts import answer_stop_ids, model_positions
from .teachers import named_member, parse_teachers


def load_for_generation(target: str, teacher: bool | str = False):
    """The model and tokenizer to generate with: a run's merged student (or, with ``teacher``, its teacher: True for
    the run's one teacher, a name for one of its --teachers), or a model directory."""
    opened = open_target(target, hub_ids=True)
    path = opened.path
    if opened.kind != "model":  # a run, or one of its checkpoints
        config = load_run_config(opened.run_dir)
        if (config.get("data") or {}).get("task") == "classification":
            raise ConfigError(f"{path} holds a classifier: generate is for causal language models (use llm-neo eval)")
        if teacher:
            return _load_model_dir(*_run_teacher(config, path, teacher), config["model"], role="teacher")
        model, tokenizer = load_run_model(path, "generate")
        return model.eval(), tokenizer
    if teacher:
        raise ConfigError("--teacher needs a run directory (it names its teacher)")
    return _load_model_dir(target, None, {}, role="student")


def _run_teacher(config: dict, path, teacher: bool | str) -> tuple[str, str | None]:
    """The run's teacher model (the one --teacher NAME names among --teachers) and its chat template."""
    members = parse_teachers((config.get("distill") or {}).get("teachers"))
    member = named_member(members, None if teacher is True else teacher, "generate",
                          f"the run in {path} gives no --teachers")
    if member is not None:
        if not member.get("model"):
            raise ConfigError(f"generate --teacher {teacher}: that teacher is served or cached; generate answers "
                              "with a model directory (give it as the target)")
        return member["model"], member.get("chat_template")
    model_path = config["model"].get("teacher_model")
    if not model_path:
        raise ConfigError(f"the run in {path} has no teacher_model (a CE-only method or a teacher cache)")
    return model_path, config["model"].get("teacher_chat_template")


def _load_model_dir(path: str, chat_template: str | None, model_options: dict, role: str):
    options = {key: value for key, value in model_options.items() if key in ("dtype", "attn_implementation",
                                                                               "allow_pickle", "trust_remote_code")}
    args = ModelArguments(student_model=path, **options)
    # a teacher of another tokenizer answers through the template it reads training rows with
    tokenizer = load_reading_tokenizer(path, args.trust_remote_code, role, chat_template=chat_template)
    model = load_pretrained_model(path, "model", LoadOptions.of(args))
    return model.eval(), tokenizer


def answer_prompts(model, tokenizer, prompts: list[str], max_new_tokens: int = 128) -> list[str]:
    """Each prompt's greedy answer of at most ``max_new_tokens`` tokens, and never past the model's positions: an
    answer that would run past them is capped there, with a note on stderr."""
    check_max_new_tokens(max_new_tokens)
    rendered = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    budgets = [answer_budget(ids.shape[1], max_new_tokens, model_positions(model), number)
               for number, ids in enumerate(rendered, start=1)]
    stops = answer_stop_ids(model, tokenizer)
    return [continue_greedily(model, tokenizer, ids, budget, stops) for ids, budget in zip(rendered, budgets, strict=True)]


def check_max_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens {max_new_tokens}: give a number of tokens >= 1")


def answer_budget(prompt_tokens: int, max_new_tokens: int, positions: int | None, number: int) -> int:
    if positions is None or prompt_tokens + max_new_tokens <= positions:
        return max_new_tokens
    if max_new_tokens >= positions:
        raise ConfigError(f"--max_new_tokens {max_new_tokens}: the model reads at most {positions} positions, prompt "
                          f"and answer together: give fewer than {positions}")
    if prompt_tokens >= positions:
        raise ConfigError(f"prompt {number} is {prompt_tokens} tokens with its chat template: the model reads at most "
                          f"{positions} positions, so no answer fits; shorten it")
    budget = positions - prompt_tokens
    print(f"prompt {number}: answer capped at {budget} tokens (its {prompt_tokens} prompt tokens and "
          f"--max_new_tokens {max_new_tokens} would pass the model's {positions} positions)", file=sys.stderr)
    return budget


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """``--prompt`` or ``--prompts FILE`` (one prompt per line; blank lines are skipped and counted on stderr)."""
    if (prompt is None) == (prompts_file is None):
        raise ConfigError("give exactly one of --prompt TEXT and --prompts FILE")
    if prompt is not None:
        if not prompt.strip():
            raise ConfigError("--prompt is blank: give the text of a user turn")
        return [prompt]
    path = Path(prompts_file)
    if not path.is_file():
        raise ConfigError(f"prompts file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"prompts file {path} holds no prompts (one per line)")
    if len(prompts) < len(lines):
        blank = len(lines) - len(prompts)
        print(f"prompts file {path}: skipped {blank} blank line{'s' if blank > 1 else ''}", file=sys.stderr)
    return prompts
