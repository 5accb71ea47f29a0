"""The lm-evaluation-harness bridge: benchmark tasks on a student model through ``lm_eval.simple_evaluate``.

lm-eval is an optional extra (``pip install 'llm-neo[eval]'``). Tasks are lm-eval task names, custom task YAMLs
found under ``include_path``, or a preset name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import ConfigError, NeoError

logger = logging.getLogger(__name__)

# The LLM-Neo paper's benchmark suite: ARC-e, ARC-c, SciQ, PIQA, MMLU, CMMLU, C-Eval.
TASK_PRESETS = {"llm-neo": ["arc_easy", "arc_challenge", "sciq", "piqa", "mmlu", "cmmlu", "ceval-valid"]}


def resolve_tasks(spec: str | list[str]) -> list[str]:
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    tasks = []
    for name in (name.strip() for name in names):
        tasks.extend(TASK_PRESETS.get(name, [name] if name else []))
    return tasks


class TaskUnavailable(NeoError):
    """An lm-eval task's data is neither reachable nor cached."""


@dataclass(frozen=True)
class HarnessTasks:
    """What lm-eval runs: the tasks (names or presets, comma-separated or a list) and how."""

    tasks: str | list[str]
    include_path: str | None = None  # a folder of custom task YAMLs
    limit: float | None = None  # examples per task (or a fraction)
    num_fewshot: int | None = None
    batch_size: int = 8


def run_lm_eval(model, tokenizer, request: HarnessTasks) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for a plain (merged) causal LM and its tokenizer."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ConfigError("--tasks needs lm-evaluation-harness: pip install 'llm-neo[eval]'") from error
    task_names, include_path = resolve_tasks(request.tasks), request.include_path
    manager = TaskManager(include_path=include_path)
    unknown = [name for name in task_names if name not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm-eval knows no task {unknown[0]!r}" + (f" (searched {include_path} too)" if include_path
                                                                    else "; custom task YAMLs need --include_path"))
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=request.batch_size, device=device)
    scores = {}
    for name in task_names:  # one at a time, so that a task whose data cannot be fetched is named
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=request.num_fewshot,
                                              limit=request.limit, task_manager=manager, log_samples=False,
                                              bootstrap_iters=0)
        except ConnectionError as error:  # datasets could not reach the hub, and has no copy in its cache
            raise TaskUnavailable(f"lm-eval task {name!r} could not be fetched ({error}): run it once with network "
                                  "(the datasets cache keeps its data), or leave it out of --tasks") from None
        scores.update({task: {metric.split(",")[0]: value for metric, value in metrics.items()
                              if isinstance(value, (int, float)) and not metric.startswith("sample")}
                       for task, metrics in results["results"].items()})
    return scores
