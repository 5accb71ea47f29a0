"""The healing experiment's results page: cache fidelity, the learning-rate sweep, held-out metrics with bootstrap
intervals, the validation curve against tokens trained, and the answers (used by heal.py's publish stage)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llmneo.runtime.layout import read_metrics  # noqa: E402

COMMAND = "python examples/smollm2/heal.py"


def read_log(run: Path) -> list[dict]:
    return read_metrics(run / "metrics.jsonl")


def curve(run: Path, validation_points, batch: int) -> list[tuple[int, float]]:
    """(conversations trained, validation perplexity) from the student before training to the end."""
    points = []
    for entry in validation_points(run):
        perplexity = next(value for key, value in entry.items() if key.endswith("_perplexity"))
        points.append((entry.get("step", 0) * batch, perplexity))
    return points


def fidelity_lines(layout) -> list[str]:
    online, cached = (read_log(layout.run(f"fidelity-{kind}")) for kind in ("online", "cached"))
    steps = [(a, b) for a, b in zip(online, cached, strict=False) if "kd_loss" in a and "kd_loss" in b]
    lines = ["| step | KD online | KD from cache | relative difference | CE online | CE from cache |",
             "|---|---|---|---|---|---|"]
    for a, b in steps:
        gap = abs(b["kd_loss"] - a["kd_loss"]) / max(abs(a["kd_loss"]), 1e-12)
        lines.append(f"| {a['step']} | {a['kd_loss']:.4f} | {b['kd_loss']:.4f} | {gap:.2%} | {a['ce_loss']:.4f} "
                     f"| {b['ce_loss']:.4f} |")
    ends = [next(entry["eval_perplexity"] for entry in reversed(log) if "eval_perplexity" in entry)
            for log in (online, cached)]
    return lines + ["", f"Validation perplexity after the last step: {ends[0]:.2f} online, {ends[1]:.2f} from the "
                        "cache."]


def interval(metrics: dict, name: str, fmt: str) -> str:
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    text = format(metrics[name], fmt)
    return f"{text} [{format(low, fmt)}, {format(high, fmt)}]" if low is not None else text


def results_lines(layout, results: dict) -> list[str]:
    peaks = json.loads(layout.memory.read_text()) if layout.memory.is_file() else {}
    lines = ["| model | wall time (s) | peak RSS (GiB) | optimizer steps | held-out PPL [95% CI] | "
             "top-1 agreement [95% CI] | KL(teacher‖student) [95% CI] |", "|---|---|---|---|---|---|---|"]
    for name, entry in results.items():
        run = layout.run(name)
        wall = (run / "wall_time_s.txt").read_text().strip() if (run / "wall_time_s.txt").is_file() else "—"
        peak = peaks.get(name.rsplit("-s", 1)[0], "—") if run.is_dir() else "—"
        steps = max((entry.get("step", 0) for entry in read_log(run)), default=0) if run.is_dir() else 0
        tokens = str(steps) if steps else "—"
        metrics = entry["held_out"]
        against_teacher = ("—", "—") if name == "teacher" else (interval(metrics, "top1_agreement", ".3f"),
                                                                interval(metrics, "kl_to_teacher", ".3f"))
        lines.append(f"| {name} | {wall} | {peak} | {tokens} | {interval(metrics, 'perplexity', '.2f')} | "
                     f"{against_teacher[0]} | {against_teacher[1]} |")
    return lines


def seed_summary(results: dict) -> list[str]:
    """Mean and spread over seeds of each method's held-out perplexity."""
    by_method: dict[str, list[float]] = {}
    for name, entry in results.items():
        if "-s" in name:
            by_method.setdefault(name.rsplit("-s", 1)[0], []).append(entry["held_out"]["perplexity"])
    lines = ["| method | seeds | mean held-out PPL | min | max |", "|---|---|---|---|---|"]
    for method, values in by_method.items():
        lines.append(f"| {method} | {len(values)} | {statistics.mean(values):.2f} | {min(values):.2f} | "
                     f"{max(values):.2f} |")
    return lines


def plot_curves(layout, names: list[str], validation_points, path: Path, batch: int) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name in names:
        points = curve(layout.run(name), validation_points, batch)
        axes.plot([tokens for tokens, _ in points], [value for _, value in points], marker="o", label=name)
    teacher = json.loads(layout.teacher_validation.read_text())["perplexity"]
    axes.axhline(teacher, color="black", linestyle="--", label="teacher")
    axes.axhline(3 * teacher, color="grey", linestyle=":", label="3 × teacher")
    axes.set_yscale("log")
    axes.set_xlabel("training conversations seen")
    axes.set_ylabel("validation perplexity (answer tokens)")
    axes.set_title("Healing the greedy 20-of-30-layer SmolLM2 student")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def answer_lines(results: dict, prompts: list[str]) -> list[str]:
    lines = []
    for index, prompt in enumerate(prompts):
        lines += ["", f"### {prompt}"]
        for name, entry in results.items():
            lines.append(f"- **{name}:** {' '.join(entry['answers'][index].split()) or '(empty)'}")
    return lines


def sweep_lines(layout, sweeps: dict, chosen: dict, validation_points) -> list[str]:
    """One row per swept rate: the method it was swept with, the rate, and the validation perplexity at the end."""
    rows = ["| swept with | learning rate | validation perplexity |", "|---|---|---|"]
    for method, rates in sweeps.items():
        for rate in rates:
            final = curve(layout.run(f"sweep-{method}-lr{rate:g}"), validation_points, 1)[-1][1]
            mark = " (chosen)" if rate == chosen[method] else ""
            rows.append(f"| {method} | {rate:g}{mark} | {final:.2f} |")
    return rows


def write_report(layout, size: dict, prompts, sweeps: dict, chosen: dict, validation_points, docs: Path) -> None:
    results = json.loads(layout.results.read_text(encoding="utf-8"))
    trained = [name for name in results if layout.run(name).is_dir()]
    docs.mkdir(parents=True, exist_ok=True)
    plot_curves(layout, trained, validation_points, docs / "heal-cpu-curve.png", size["batch"])
    lines = [
        "# Healing the greedy 20-of-30-layer SmolLM2 student", "",
        f"Command: `{COMMAND}` (all stages; each is resumable and skips finished runs). Teacher: SmolLM2-135M-Instruct "
        "(the packaged GGUF, imported). Student: the teacher pruned greedily to 20 of 30 layers "
        "(docs/results/smollm2/pruning-cpu.md). Data: ShareGPT conversations, prompts under "
        f"{2 * size['max_length']} characters, split into {size['train']} training, {size['validation']} validation "
        f"and {size['held_out']} held-out conversations (disjoint, none of them a pruning calibration row), "
        f"max_length {size['max_length']}, batch {size['batch']}, one epoch for every method (the same rows and "
        f"steps: an equal token budget), LoRA r = {size['rank']} (α_lora = {2 * size['rank']}) on every linear "
        f"layer, α = 0.5, T = 1, warmup 10 steps then cosine. KD and Neo read one teacher cache (top-{size['top_k']} "
        "log-probabilities in float16 plus one tail bucket for the rest of the vocabulary).", "",
        "## The cached KD term tracks the online one",
        f"Neo for {size['fidelity_steps']} steps from the same seed, once with the teacher online and once from the "
        "cache:", "", *fidelity_lines(layout), "",
        "## Learning rate, chosen on the validation rows",
        f"{size['sweep_steps']} steps at each rate from the same seed, scored by validation perplexity at the end: "
        f"neo for the adapter rates ({chosen['neo']:g} was taken for lora and neo), kd for the full fine-tuning "
        f"rates ({chosen['kd']:g} was taken for sft and kd).", "", *sweep_lines(layout, sweeps, chosen,
                                                                                 validation_points), "",
        "## Held-out results (bootstrap 95% intervals over the held-out conversations)", "",
        *results_lines(layout, results), "",
        "Wall time covers the whole run: loading, the before and after evaluations, the answers and training. A run "
        "that shared the 2 cores with other work (a held-out evaluation for lora-s0 and neo-s1, a CI run for part of "
        "kd-s0) took longer than one that ran alone, so compare costs only between runs that had the machine to "
        "themselves. Peak RSS is measured apart: a few steps of each method with the same settings, each measured on "
        "its own (the `memory` stage).", "",
        "Over seeds:", "", *seed_summary(results), "",
        "## Validation perplexity against conversations trained", "", "![curve](heal-cpu-curve.png)", "",
        "## Answers (greedy, 64 new tokens, through the chat template)", *answer_lines(results, prompts), ""]
    (docs / "heal-cpu.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
