"""Regenerate docs/demo-experiments/: compare, sweep and scaling on the demo-sized setup (CPU, ~10 minutes).

    python scripts/demo_experiments.py [--work runs/demo-experiments]

Uses `llm-neo demo`'s setup: a 4-layer teacher trained on the shipped conversations, a 2-layer student pruned
from it, 200 held-out conversations. Then runs `llm-neo compare`, `llm-neo sweep` and `llm-neo scaling` through
the CLI and copies their reports and figures into docs/.
"""

import argparse
import shutil
from pathlib import Path

from llmneo import cli
from llmneo.demo.run import run_demo

DOCS = Path(__file__).resolve().parent.parent / "docs" / "demo-experiments"
COMMON = ["--num_train_epochs", "2", "--per_device_train_batch_size", "32", "--max_length", "96", "--logging_steps",
          "20", "--disable_tqdm", "true", "--seed", "0", "--lora_r", "16"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/demo-experiments")
    work = Path(parser.parse_args().work)
    run_demo(str(work / "demo"))
    demo = work / "demo"
    base = ["--teacher_model", str(demo / "teacher-run" / "model"), "--student_model", str(demo / "student"),
            "--dataset", str(demo / "data" / "train.jsonl"), "--eval_split", str(demo / "data" / "held_out.jsonl"),
            *COMMON]
    steps = [
        ("compare", ["--adapter_learning_rate", "2e-3", "--full_learning_rate", "2e-4"]),
        ("sweep", ["--ranks", "2,4,8,16,32", "--learning_rates", "5e-4,1e-3,2e-3,5e-3"]),
        ("scaling", ["--samples", "100,300,1000,2800", "--learning_rate", "2e-3"]),
    ]
    DOCS.mkdir(parents=True, exist_ok=True)
    for command, options in steps:
        out = work / command
        assert cli.main([command, "--output", str(out), *options, *base]) == 0
        for item in out.iterdir():
            if item.suffix in (".md", ".png", ".csv"):
                shutil.copy2(item, DOCS / (item.name if item.name != "report.md" else f"{command}.md"))
    print(f"docs written to {DOCS}")


if __name__ == "__main__":
    main()
