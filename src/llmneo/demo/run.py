"""`llm-neo demo`: the whole path offline on tiny models built from the shipped corpus.

1. split the shipped conversations into train and held-out rows;
2. train a small teacher from scratch (the `sft` method of this library);
3. make a smaller student by dropping half of the teacher's layers;
4. distil the teacher into the student with `neo` (LoRA + CE/KD);
5. print held-out perplexity, top-1 agreement and KL to the teacher before and after.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

from ..adapters.store import load_adapter
from ..config import parse_config
from ..data.collators import make_collator
from ..data.loading import build_dataset
from ..evaluation.metrics import HeldOutOptions, evaluate_against_teacher
from ..models.loading import load_student, load_student_tokenizer, load_tokenizer
from ..pipeline import distill
from ..teacher.loading import load_teacher
from ..pruning import prune_layers
from .tiny import build_tiny_llama, build_tokenizer, corpus_rows, corpus_texts

HELD_OUT_ROWS = 200
TEACHER_SHAPE = {"hidden_size": 64, "num_layers": 4, "num_heads": 4}
STUDENT_LAYERS = [0, 3]
# The demo owns its scratch folder: running it again replaces its own runs.
COMMON_FLAGS = ["--per_device_train_batch_size", "32", "--logging_steps", "20", "--max_length", "96",
                "--overwrite_output_dir", "true"]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _split_corpus(out: Path, seed: int) -> tuple[Path, Path]:
    rows = corpus_rows()
    random.Random(seed).shuffle(rows)
    train, held_out = out / "data" / "train.jsonl", out / "data" / "held_out.jsonl"
    _write_jsonl(held_out, rows[:HELD_OUT_ROWS])
    _write_jsonl(train, rows[HELD_OUT_ROWS:])
    return train, held_out


def _train_teacher(out: Path, train: Path, seed: int) -> Path:
    tokenizer = build_tokenizer(corpus_texts())
    init_dir = out / "teacher-init"
    build_tiny_llama(tokenizer, seed=seed, **TEACHER_SHAPE).save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    config = parse_config([
        "--method", "sft", "--student_model", str(init_dir), "--dataset", str(train),
        "--output_dir", str(out / "teacher-run"), "--learning_rate", "3e-3", "--num_train_epochs", "4",
        "--seed", str(seed), *COMMON_FLAGS,
    ])
    return distill(config).weights_dir


def _make_student(model_args) -> None:
    """Save the depth-pruned teacher (with its tokenizer) where the config expects the student."""
    prune_layers(load_teacher(model_args), STUDENT_LAYERS).save_pretrained(model_args.student_model)
    load_tokenizer(model_args.teacher_model, role="teacher").save_pretrained(model_args.student_model)


def _evaluate(config, student, teacher, tokenizer, held_out: Path) -> dict:
    data, _ = build_dataset(dataclasses.replace(config.data, dataset=str(held_out)), tokenizer, seed=0)
    return evaluate_against_teacher(student, data, make_collator(tokenizer), teacher, HeldOutOptions(batch_size=32))


def run_demo(output_dir: str = "runs/demo", seed: int = 0, adapter: str = "lora") -> dict[str, dict]:
    start = time.time()
    out = Path(output_dir)
    train, held_out = _split_corpus(out, seed)
    print(f"[demo] training a {TEACHER_SHAPE['num_layers']}-layer teacher from scratch on {train} ...")
    teacher_dir = _train_teacher(out, train, seed)
    config = parse_config([
        "--method", "neo", "--teacher_model", str(teacher_dir), "--student_model", str(out / "student"),
        "--dataset", str(train), "--output_dir", str(out / "neo-run"), "--lora_r", "16", "--learning_rate", "2e-3",
        "--num_train_epochs", "2", "--seed", str(seed), "--adapter", adapter, *COMMON_FLAGS,
    ])
    _make_student(config.model)
    tokenizer = load_student_tokenizer(config.model)
    teacher = load_teacher(config.model)
    results = {
        "teacher": _evaluate(config, teacher, teacher, tokenizer, held_out),
        "student before": _evaluate(config, load_student(config.model), teacher, tokenizer, held_out),
    }
    print(f"[demo] distilling into a {len(STUDENT_LAYERS)}-layer student with neo ({adapter}, r=16) ...")
    summary = distill(config)
    trained = load_adapter(load_student(config.model), summary.weights_dir)
    results["student after"] = _evaluate(config, trained, teacher, tokenizer, held_out)
    print_table(results, time.time() - start)
    print_outputs(teacher_dir, Path(config.model.student_model), summary.run_dir)
    return results


def print_outputs(teacher_dir: Path, student_dir: Path, run_dir: Path) -> None:
    """Where the demo's models are, and what to try next with them."""
    print(f"[demo] teacher: {teacher_dir}\n[demo] student before distillation: {student_dir}\n"
          f"[demo] distilled run (adapter, metrics, report.md): {run_dir}\n"
          f"[demo] try: llm-neo generate {run_dir} --prompt \"What is the capital of France?\"")


def print_table(results: dict[str, dict], seconds: float) -> None:
    columns = [("perplexity", "held-out perplexity", "{:.3f}"), ("top1_agreement", "top-1 agreement", "{:.1%}"),
               ("kl_to_teacher", "KL(teacher||student)", "{:.4f}")]
    header = f"{'model':<16}" + "".join(f"{title:>24}" for _, title, _ in columns)
    print("\n" + header + "\n" + "-" * len(header))
    for name, metrics in results.items():
        print(f"{name:<16}" + "".join(f"{fmt.format(metrics[key]):>24}" for key, _, fmt in columns))
    print(f"\n[demo] done in {seconds:.0f} s; held-out answer tokens: {results['teacher']['answer_tokens']}")
