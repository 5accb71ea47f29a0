"""docs/results/smollm2/multi-teacher-cpu.md from multi_teacher.py's results.json."""

from __future__ import annotations

from pathlib import Path

NAMES = {"before": "student before", "lora": "lora (CE only)", "neo-smollm2": "neo, SmolLM2 alone",
         "neo-gemma": "neo, Gemma alone (uld)", "neo-mixture": "neo, mixture 0.5 / 0.5",
         "neo-column": "neo, column (chat -> SmolLM2, docs -> Gemma)", "lora-mixed": "lora (CE only)"}
MAIN = ("before", "lora", "neo-smollm2", "neo-gemma", "neo-mixture")


def interval(metrics: dict, name: str, digits: int = 3) -> str:
    value = metrics.get(name)
    if value is None:
        return "—"
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    text = f"{value:.{digits}f}"
    return f"{text} [{low:.{digits}f}, {high:.{digits}f}]" if low is not None and high is not None else text


def runs_of(results: dict, arm: str) -> list[tuple[str, dict]]:
    return sorted((key, entry) for key, entry in results.items() if key.rsplit("-seed", 1)[0] == arm)


def label(key: str) -> str:
    arm, seed = key.rsplit("-seed", 1)
    return NAMES[arm] if arm == "before" else f"{NAMES[arm]}, seed {seed}"


def held_out_table(results: dict, arms, corpus: str) -> list[str]:
    lines = ["| student | bits per byte | perplexity | KL(SmolLM2‖student) | top-1 agreement with SmolLM2 | aligned KL(Gemma‖student)"
             " | aligned agreement with Gemma | wall time (s) |", "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        for key, entry in runs_of(results, arm):
            if corpus not in entry:
                continue
            smol, gemma = entry[corpus]["smollm2"], entry[corpus]["gemma"]
            wall = f"{entry['wall_time_s']:.0f}" if "wall_time_s" in entry else "—"
            lines.append(f"| {label(key)} | {interval(smol, 'bits_per_byte')} | {interval(smol, 'perplexity', 2)} | "
                         f"{interval(smol, 'kl_to_teacher')} | "
                         f"{interval(smol, 'top1_agreement')} | {interval(gemma, 'aligned_kl')} | "
                         f"{interval(gemma, 'aligned_top1_agreement')} | {wall} |")
    return lines


def on_policy_table(results: dict, arms) -> list[str]:
    lines = ["| student | reverse KL to SmolLM2 | SmolLM2's NLL per token | reverse KL to Gemma (per student token) | "
             "Gemma's NLL per student token | repetition rate | distinct-2 |", "|---|---|---|---|---|---|---|"]
    for arm in arms:
        for key, entry in runs_of(results, arm):
            smol, gemma = entry["sharegpt"].get("smollm2/on_policy"), entry["sharegpt"].get("gemma/on_policy")
            if not smol or not gemma:
                continue
            lines.append(f"| {label(key)} | {interval(smol, 'on_policy_reverse_kl')} | "
                         f"{interval(smol, 'teacher_nll_per_token')} | {interval(gemma, 'on_policy_reverse_kl')} | "
                         f"{interval(gemma, 'teacher_nll_per_token')} | {interval(smol, 'repetition_rate', 2)} | "
                         f"{interval(smol, 'distinct_2', 2)} |")
    return lines


SEED_FIGURES = (("bits per byte", "smollm2", "bits_per_byte"), ("KL(SmolLM2‖student)", "smollm2", "kl_to_teacher"),
                ("aligned KL(Gemma‖student)", "gemma", "aligned_kl"),
                ("on-policy reverse KL to SmolLM2", "smollm2/on_policy", "on_policy_reverse_kl"),
                ("on-policy reverse KL to Gemma", "gemma/on_policy", "on_policy_reverse_kl"))


def seeds_table(results: dict, arms) -> list[str]:
    """Each arm's mean over its seeds, with every seed's figure beside it (the spread the intervals leave out)."""
    lines = ["| student | " + " | ".join(name for name, _, _ in SEED_FIGURES) + " |",
             "|---|" + "---|" * len(SEED_FIGURES)]
    for arm in arms:
        entries = [entry["sharegpt"] for _, entry in runs_of(results, arm)]
        if len(entries) < 2:
            continue
        cells = []
        for _, part, metric in SEED_FIGURES:
            values = [entry[part][metric] for entry in entries if part in entry]
            cells.append(f"{sum(values) / len(values):.3f} ({' / '.join(f'{v:.3f}' for v in values)})"
                         if len(values) == len(entries) else "—")
        lines.append(f"| {NAMES[arm]} | " + " | ".join(cells) + " |")
    return lines


def answers(results: dict, prompts: list[str], arms) -> list[str]:
    lines = []
    for index, prompt in enumerate(prompts):
        lines += ["", f"**{prompt}**", ""]
        for arm in arms:
            for key, entry in runs_of(results, arm):
                if key.endswith("seed1"):
                    continue
                text = " ".join(entry["answers"][index].split()) or "(empty)"
                lines.append(f"- *{label(key)}*: {text}")
    return lines


def missing_runs(results: dict) -> list[str]:
    """The planned runs with no figures (not trained or not evaluated), said rather than left out silently."""
    planned = [f"{arm}-seed{seed}" for seed in (0, 1) for arm in MAIN[1:]] + ["neo-column-seed0", "lora-mixed-seed0"]
    missing = [key for key in planned if key not in results]
    return [f"- **Not in the tables**: {', '.join(missing)} (not finished within the session that made this page; "
            "run the script again to add them: finished runs are skipped)."] if missing else []


def write_report(results: dict, size: dict, path: Path, prompts: list[str]) -> None:
    lines = [
        "# Two teachers of two tokenizers in one run: SmolLM2-135M-Instruct and Gemma-3-270M into the pruned "
        "SmolLM2 (CPU)", "",
        "Reproduce: `python examples/smollm2/multi_teacher.py` (after cross_tokenizer.py's prepare stage). Numbers "
        "below are written by its publish stage from `results.json`.", "",
        "## Setup", "",
        f"- **Student**: SmolLM2-135M-Instruct pruned to 20 of its 30 layers (block influence on 16 ShareGPT "
        f"calibration conversations). LoRA r = {size['rank']} (α_lora {2 * size['rank']}) on every linear layer, "
        f"learning rate {size['learning_rate']}, batch {size['batch']}, max_length {size['max_length']}, one epoch "
        "(an equal token budget for every run), α = 0.5, T = 1, forward KL.",
        "- **Teachers**: SmolLM2-135M-Instruct (the student's tokenizer) and Gemma-3-270M (base model, another "
        "tokenizer: `--cross_tokenizer uld`, its rows read through llm-neo's fallback template).",
        f"- **ShareGPT runs**: the same {size['train']} training conversations; two seeds each. The mixture is "
        "`--teachers` with `--teacher_routing mixture --teacher_weights 0.5,0.5`; the single-teacher runs are the "
        "one-teacher options.",
        f"- **Column run**: {size['train'] - size['docs_train']} of those conversations and {size['docs_train']} "
        "Python-docs passages (each the answer to \"Show a passage of the Python documentation.\") in one file, each "
        "row naming its teacher: conversations SmolLM2-Instruct (the chat model), docs passages Gemma-3 (the base "
        "model); beside it lora on the same rows. Seed 0.",
        f"- **Held-out**: {size['held_out']} ShareGPT conversations and {size['held_out']} docs passages no run "
        "trained on; bootstrap 95% intervals over the rows. KL and agreement are against each teacher (Gemma's at "
        "aligned boundaries). On-policy: the student's greedy and sampled answers "
        f"({size['on_policy_tokens']} new tokens) to {size['on_policy_prompts']} held-out prompts, scored by each "
        "teacher (reverse KL per student token; across tokenizers per aligned byte span, summed per student token).",
        *missing_runs(results), "", "## ShareGPT: each teacher alone, their mixture, and lora", "",
        *held_out_table(results, MAIN, "sharegpt"), "", "**On-policy figures (ShareGPT held-out prompts)**", "",
        *on_policy_table(results, MAIN), "",
        "**Across seeds (ShareGPT held-out): the mean of the seeds (seed 0 / seed 1)**", "",
        *seeds_table(results, MAIN[1:]), "",
        "## Column routing: chat rows to SmolLM2, docs rows to Gemma", "",
        "**ShareGPT held-out**", "", *held_out_table(results, ("before", "neo-column", "lora-mixed"), "sharegpt"), "",
        "**Python-docs held-out (each passage the answer to the docs prompt)**", "",
        *held_out_table(results, ("before", "neo-column", "lora-mixed"),
                                                                     "mixed-docs"), "",
        "## Answers (greedy, 64 new tokens, seed 0)", *answers(results, prompts, (*MAIN, "neo-column")), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
