"""On-policy steps through the real TokenDistillTrainer: rollout tokens/s, training tokens/s, and the step beside an
off-policy step on the same rows.

    python benchmarks/on_policy.py                    # CPU: small random-init Llamas, 64 new tokens
    python benchmarks/on_policy.py --preset llama     # GPU: Llama-3.1-8B teacher, Llama-3.2-1B student, 256 new tokens

Rows are synthetic (random ids: a prompt, then as many answer tokens as a rollout's budget). Random weights rarely
sample EOS, so every answer runs to the token budget: the figures are for full-length answers. Rollout tokens/s counts generated
tokens over generation time (KV cache, batched, per-row seeded sampling at T = 1); training tokens/s counts the
on-policy batches' tokens (prompt + answer) over the step time outside generation. Times are means over all
steps, the first (warm-up) included, for both kinds of step.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import PRESETS, build_llama, padding_collator, synthetic_rows, train_steps, word_tokenizer

from llmneo.adapters.lora import add_lora
from llmneo.config import AdapterArguments
from llmneo.data.tokenize import FALLBACK_CHAT_TEMPLATE
from llmneo.teacher.sources import OnlineTeacher

NEW_TOKENS = {"cpu": 64, "llama": 256}


def run(student, teacher, dataset, tokenizer, preset, args, out: Path, fraction: float):
    trainer, clock = train_steps(student, dataset, padding_collator(), preset, args.steps, out,
                                 OnlineTeacher(teacher, None), tokenizer=tokenizer, on_policy_fraction=fraction,
                                 rollout_max_new_tokens=args.new_tokens, rollout_temperature=1.0)
    return trainer, clock.seconds_per_step()  # all steps: the rollout figures cannot leave the first one out


def prompt_rows(rows: int, prompt: int, answer: int, vocab: int):
    """Random rows of ``prompt`` unlabelled then ``answer`` labelled tokens: on-policy rows have the same shape."""
    dataset = synthetic_rows(rows, prompt + answer, vocab)
    labels = [[-100] * prompt + row[prompt:] for row in dataset["input_ids"]]
    return dataset.remove_columns("labels").add_column("labels", labels)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="llama" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=None, help="rollout budget (default 64 CPU, 256 llama)")
    args = parser.parse_args(argv)
    args.new_tokens = args.new_tokens or NEW_TOKENS[args.preset]
    return args


def main():
    args = parse_args()
    preset = PRESETS[args.preset]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab, batch = preset["vocab"], preset["batch"]
    prompt = preset["seq"] // 4
    dataset = prompt_rows(args.steps * batch, prompt, args.new_tokens, vocab)
    tokenizer = word_tokenizer(vocab)
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    teacher = build_llama(vocab, preset["teacher"], preset["dtype"], seed=1).eval().requires_grad_(False).to(device)
    figures = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, fraction in (("off", 0.0), ("on", 1.0)):
            student = add_lora(build_llama(vocab, preset["student"], preset["dtype"], seed=2),
                               AdapterArguments(lora_r=preset["rank"]))
            figures[name] = run(student, teacher, dataset, tokenizer, preset, args, Path(scratch) / name, fraction)
    trainer, on_step = figures["on"]
    stats = trainer.on_policy.rollouts.stats  # every step's rollouts, warm-up included
    rollout_per_step = stats.seconds / args.steps
    rollout_tps = stats.tokens / stats.seconds
    train_tokens = batch * (prompt + stats.tokens / max(stats.answers, 1))
    print(f"preset {args.preset} on {device}: teacher {preset['teacher']}, student {preset['student']} "
          f"(hidden, layers, heads, intermediate), V={vocab}, {batch} rows of {prompt} prompt tokens, "
          f"{args.new_tokens} new tokens, LoRA r={preset['rank']}, {args.steps} steps, KD forward KL (full)")
    print("| step | s/step | rollout s/step | rollout tokens/s | training tokens/s |")
    print("|---|---|---|---|---|")
    off_step = figures["off"][1]
    print(f"| off-policy (dataset answers) | {off_step:.3f} | | | {batch * (prompt + args.new_tokens) / off_step:,.0f} |")
    print(f"| on-policy (full) | {on_step:.3f} | {rollout_per_step:.3f} | {rollout_tps:,.0f} | "
          f"{train_tokens / max(on_step - rollout_per_step, 1e-9):,.0f} |")
    print(f"answers cut at the budget: {stats.cut / max(stats.answers, 1):.0%}")


if __name__ == "__main__":
    main()
