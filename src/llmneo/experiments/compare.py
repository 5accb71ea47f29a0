"""`llm-neo compare`: the four methods on the same data, budget and seed, as the paper's Table I."""

from __future__ import annotations

from pathlib import Path

from ..methods import METHODS as PRESETS
from ..report import bar_chart, markdown_table
from .cells import run_cell
from .grid import base_options, output_dir, write_csv

METHODS = ("sft", "lora", "kd", "neo")
CHART_METRICS = ["perplexity", "top1_agreement", "kl_to_teacher", "peak_memory_gib", "wall_time_s"]
CLASSIFICATION_CHART_METRICS = ["accuracy", "f1", "teacher_agreement", "peak_memory_gib", "wall_time_s"]


def _learning_rate(method: str, learning_rates: dict) -> list[str]:
    rate = learning_rates.get("adapter" if PRESETS[method].uses_adapter else "full")
    return ["--learning_rate", str(rate)] if rate is not None else []


COST_COLUMNS = [("method", "Method"), ("trainable_parameters", "Trainable params"),
                ("peak_memory_gib", "Peak memory (GiB)"), ("wall_time_s", "Wall time (s)")]
TABLE = COST_COLUMNS + [("perplexity", "Held-out PPL"), ("top1_agreement", "Top-1 agreement"),
                        ("kl_to_teacher", "KL(teacher‖student)")]
CLASSIFICATION_TABLE = COST_COLUMNS + [("accuracy", "Accuracy"), ("f1", "F1"), ("precision", "Precision"),
                                       ("recall", "Recall"), ("teacher_agreement", "Agreement with teacher"),
                                       ("kl_to_teacher", "KL(teacher‖student)")]


def compare(argv: list[str], output: str | None = None, methods=METHODS, eval_options: dict | None = None,
            learning_rates: dict[str, float] | None = None) -> list[dict]:
    """Train and evaluate each method; write compare.csv, compare.png and report.md under the output folder.

    ``learning_rates`` may set the rate of the full fine-tuning methods (``full``) and of the adapter methods
    (``adapter``); otherwise each method takes the run's learning_rate or its own default.
    """
    argv, config = base_options(argv)
    out = output_dir(output, config, "compare")
    rows = [run_cell([*argv, "--method", method, *_learning_rate(method, learning_rates or {})], out / method,
                     {"method": method}, eval_options)
            for method in methods]
    write_csv(rows, out / "compare.csv")
    task_columns = [(key, key) for key in rows[0] if "/" in key]
    classifying = config.data.task == "classification"
    bar_chart(rows, "method", CLASSIFICATION_CHART_METRICS if classifying else CHART_METRICS, out / "compare.png",
              f"{Path(config.model.student_model).name} from {Path(config.model.teacher_model or '').name}")
    lines = ["# Methods compared (Table I layout)", "",
             f"Teacher `{config.model.teacher_model}`, student `{config.model.student_model}`, data "
             f"`{config.data.dataset}`; same data, steps and seed for every method. Peak memory is "
             "CUDA max allocated on a GPU and process peak RSS on CPU; wall time covers loading and training.", "",
             markdown_table(rows, (CLASSIFICATION_TABLE if classifying else TABLE) + task_columns), "",
             "![methods compared](compare.png)", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return rows
