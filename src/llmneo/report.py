"""Reports people look at: a run's training curves and report.md, and the figures of the experiments (bars for
compare, a heatmap for sweep, a line for scaling). Each plot function returns the data it drew, so callers and
tests can check the numbers behind the picture."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from .runtime.layout import CURVES_FILE, METRICS_FILE, REPORT_FILE, read_metrics  # noqa: E402

TRAIN_KEYS = ("loss", "ce_loss", "kd_loss")


def _series(entries: list[dict], key: str) -> tuple[list, list]:
    points = [(entry["step"], entry[key]) for entry in entries if isinstance(entry.get(key), (int, float))]
    return [step for step, _ in points], [value for _, value in points]


def plot_training_curves(entries: list[dict], path: Path) -> dict[str, tuple[list, list]]:
    """Loss terms, learning rate and eval metrics against the optimizer step, one panel each."""
    eval_keys = sorted({key for entry in entries for key in entry if key.startswith("eval_")
                        and key not in ("eval_answer_tokens", "eval_runtime") and "per_second" not in key})
    panels = {"loss terms": list(TRAIN_KEYS), "learning rate": ["learning_rate"]}
    panels.update({key.removeprefix("eval_"): [key] for key in eval_keys})
    drawn = {}
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for axis, (title, keys) in zip(axes[0], panels.items(), strict=True):
        for key in keys:
            steps, values = _series(entries, key)
            if steps:
                axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
                drawn[key] = (steps, values)
        axis.set_title(title)
        axis.set_xlabel("step")
        if len(keys) > 1:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return drawn


def write_run_report(run_dir: Path, final_metrics: dict, card_rows: list[tuple[str, object]],
                     before_after: list[tuple] | None = None, samples: dict | None = None) -> Path:
    """training_curves.png and a short report.md (settings, before/after and final metrics, answers to held-out
    prompts) in the run directory."""
    run_dir = Path(run_dir)
    entries = read_metrics(run_dir / METRICS_FILE)
    plot_training_curves(entries, run_dir / CURVES_FILE)
    lines = ["# Run report", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in card_rows]
    lines += before_after_markdown(before_after or [])
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_format(value)} |" for key, value in final_metrics.items()]
    lines += answers_markdown(samples or {})
    lines += ["", f"![training curves]({CURVES_FILE})", ""]
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


COUNT_KEYS = ("answer_tokens", "texts")  # how much was measured, not how well


def before_after_rows(before: dict, final_metrics: dict) -> list[tuple[str, float, float]]:
    """(metric, before training, after training) for each held-out metric measured both times."""
    after = {key.removeprefix("eval_"): value for key, value in final_metrics.items() if key.startswith("eval_")}
    return [(name, before[name], value) for name, value in after.items()
            if name in before and name not in COUNT_KEYS and isinstance(value, (int, float))]


def before_after_markdown(rows: list[tuple]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Held-out metrics before and after training", "", "| metric | before | after |", "|---|---|---|"]
    return lines + [f"| {name} | {_format(before)} | {_format(after)} |" for name, before, after in rows]


def before_after_console(rows: list[tuple]) -> str:
    """The same comparison as a plain-text table for the console."""
    lines = [f"{'held-out':<18}{'before training':>18}{'after training':>18}"]
    lines += [f"{name:<18}{_format(before):>18}{_format(after):>18}" for name, before, after in rows]
    return "\n".join(lines)


def answers_markdown(samples: dict) -> list[str]:
    """Held-out prompts with the teacher's and the student's answers before and after training."""
    if not samples.get("prompts"):
        return []
    lines = ["", "## Answers to held-out prompts (greedy)"]
    for index, prompt in enumerate(samples["prompts"]):
        lines += ["", f"### Prompt {index + 1}", "", "```", prompt.strip(), "```"]
        for who in ("teacher", "student before", "student after"):
            if samples.get(who):
                lines += [f"**{who}:**", "", "```", samples[who][index].strip() or "(empty)", "```"]
    return lines


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def bar_chart(rows: list[dict], label_key: str, metric_keys: list[str], path: Path, title: str) -> dict:
    """One panel per metric, one bar per row (e.g. per method)."""
    labels = [str(row[label_key]) for row in rows]
    drawn = {}
    figure, axes = plt.subplots(1, len(metric_keys), figsize=(3.6 * len(metric_keys), 3.4), squeeze=False)
    for axis, key in zip(axes[0], metric_keys, strict=True):
        values = [row.get(key, math.nan) for row in rows]
        axis.bar(labels, values, color=plt.cm.tab10.colors[: len(labels)])
        axis.set_title(key)
        axis.tick_params(axis="x", rotation=30)
        drawn[key] = dict(zip(labels, values, strict=True))
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return drawn


@dataclass(frozen=True)
class Axis:
    """One axis of a grid: its name and the labels of its rows or columns."""

    name: str
    labels: list


def heatmap(values: list[list[float]], rows: Axis, columns: Axis, path: Path, title: str) -> list[list[float]]:
    """A grid of values (rows x columns) with each cell annotated."""
    row_labels, column_labels, row_name, column_name = rows.labels, columns.labels, rows.name, columns.name
    figure, axis = plt.subplots(figsize=(1.2 * len(column_labels) + 2.5, 0.8 * len(row_labels) + 2))
    image = axis.imshow(values, cmap="viridis", aspect="auto")
    axis.set_xticks(range(len(column_labels)), [str(label) for label in column_labels])
    axis.set_yticks(range(len(row_labels)), [str(label) for label in row_labels])
    axis.set_xlabel(column_name)
    axis.set_ylabel(row_name)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            axis.text(j, i, "—" if math.isnan(value) else f"{value:.3g}", ha="center", va="center", color="w")
    figure.colorbar(image, ax=axis)
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return values


def line_plot(xs: list[float], ys: list[float], path: Path, title: str, x_name: str, y_name: str) -> tuple[list, list]:
    figure, axis = plt.subplots(figsize=(5, 3.6))
    axis.plot(xs, ys, marker="o")
    axis.set_xscale("log")
    axis.set_xlabel(x_name)
    axis.set_ylabel(y_name)
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return xs, ys


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns``: (key, header) pairs."""
    lines = ["| " + " | ".join(header for _, header in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(key, "")) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)
