"""Before and after: the student's held-out metrics (and its and the teacher's answers to a few held-out prompts)
measured before the first step, kept in before.json, and set beside the final ones when the run ends."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..report import before_after_console, before_after_rows
from ..runtime.atomic import write_atomically
from ..runtime.layout import BEFORE_FILE
from .answers import answers, held_out_prompts, held_out_teacher_prompts

SAMPLE_PROMPTS = 3  # held-out prompts answered in report.md


def measure_before(trainer, config, tokenizer, held_out, resume, teacher_tokenizer=None) -> dict | None:
    """The student's held-out metrics (and, for causal_lm, its and the teacher's answers to a few held-out prompts)
    before the first step, kept in before.json so that a resumed run reports the same starting point."""
    if held_out is None:
        return None
    path = Path(config.training.output_dir) / BEFORE_FILE
    if resume is not None and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    metrics = {key.removeprefix("before_"): value for key, value in trainer.evaluate(metric_key_prefix="before").items()}
    before = {"metrics": metrics, "samples": {}}
    if config.data.task == "causal_lm" and trainer.is_world_process_zero():
        prompts = held_out_prompts(held_out, SAMPLE_PROMPTS)
        before["prompt_ids"] = [ids[0].tolist() for ids in prompts]
        before["samples"] = {"prompts": [tokenizer.decode(ids[0], skip_special_tokens=True) for ids in prompts],
                             "student before": answers(trainer.model, tokenizer, prompts)}
        if trainer.teacher is not None and teacher_tokenizer is not None:
            before["samples"]["teacher"] = answers(trainer.teacher, teacher_tokenizer,
                                                   held_out_teacher_prompts(held_out, SAMPLE_PROMPTS))
        elif trainer.teacher is not None:
            before["samples"]["teacher"] = answers(trainer.teacher, tokenizer, prompts)
    if trainer.is_world_process_zero():
        write_atomically(path, (json.dumps(before, indent=1) + "\n").encode("utf-8"))
    return before


def compare_with_before(trainer, tokenizer, before: dict | None, final_metrics: dict):
    """The before/after table (printed on the console) and the answers after training next to those before."""
    if before is None:
        return None, None
    comparison = before_after_rows(before["metrics"], final_metrics)
    samples = dict(before.get("samples") or {})
    if before.get("prompt_ids") and trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        samples["student after"] = answers(model, tokenizer, [torch.tensor([ids]) for ids in before["prompt_ids"]])
    if trainer.is_world_process_zero() and comparison:
        print("\n" + before_after_console(comparison) + "\n", flush=True)
    return comparison, samples
