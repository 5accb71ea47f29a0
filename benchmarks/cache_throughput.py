"""Student-phase throughput with the teacher online vs from the offline top-k cache, through the real TokenDistillTrainer.

    python benchmarks/cache_throughput.py                  # CPU: small random-init Llamas
    python benchmarks/cache_throughput.py --preset llama   # GPU: Llama-3.1-8B teacher, Llama-3.2-1B student shapes

Both runs train the same LoRA student (neo, fused loss) on the same synthetic rows (random ids, the first quarter
of each row a prompt) for the same steps; tokens/s counts every token of the micro-batches and skips the first
step (warm-up). The capture's own throughput and bytes per answer token are printed too. Weights are random:
throughput does not depend on their values.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import PRESETS, build_llama, padding_collator, synthetic_rows, train_steps

from llmneo.adapters.lora import add_lora
from llmneo.config import AdapterArguments
from llmneo.teacher.cache import TeacherCache
from llmneo.teacher.capture import CaptureJob, CaptureSettings, write_cache
from llmneo.teacher.sources import CachedTeacher, OnlineTeacher


def train_tokens_per_second(student, dataset, collator, preset, steps, out, signal) -> float:
    _, clock = train_steps(student, dataset, collator, preset, steps, out, signal)
    steps, seconds = clock.seconds_after_first()
    return steps * preset["batch"] * preset["seq"] / seconds


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="llama" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--top_k", type=int, default=64)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    preset = PRESETS[args.preset]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = args.steps * preset["batch"]
    dataset = synthetic_rows(rows, preset["seq"], preset["vocab"])
    collator = padding_collator()
    teacher = build_llama(preset["vocab"], preset["teacher"], preset["dtype"], seed=1).eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        started = time.perf_counter()
        job = CaptureJob(teacher.to(device), dataset, collator,
                         CaptureSettings(top_k=args.top_k, batch_size=preset["batch"]), preset["vocab"])
        manifest = write_cache(scratch / "cache", job,
                               {"benchmark": args.preset, "data": {"rows": rows, "answer_tokens": _answer_tokens(dataset)}})
        capture_seconds = time.perf_counter() - started
        student = add_lora(build_llama(preset["vocab"], preset["student"], preset["dtype"], seed=2),
                           AdapterArguments(lora_r=preset["rank"]))
        online = train_tokens_per_second(student, dataset, collator, preset, args.steps, scratch / "online",
                                         signal=OnlineTeacher(teacher, None))
        del teacher
        student = add_lora(build_llama(preset["vocab"], preset["student"], preset["dtype"], seed=2),
                           AdapterArguments(lora_r=preset["rank"]))
        cached = train_tokens_per_second(student, dataset, collator, preset, args.steps, scratch / "cached",
                                         signal=CachedTeacher(TeacherCache(scratch / "cache"), preset["vocab"]))
    print(f"preset {args.preset} on {device}: teacher {preset['teacher']}, student {preset['student']} "
          f"(hidden, layers, heads, intermediate), V={preset['vocab']}, {preset['batch']}x{preset['seq']} tokens per "
          f"step, LoRA r={preset['rank']}, top-{args.top_k}, {args.steps} steps")
    print("| phase | tokens/s | vs online |")
    print("|---|---|---|")
    print(f"| capture (teacher forward + top-k) | {rows * preset['seq'] / capture_seconds:,.0f} | |")
    print(f"| student, teacher online | {online:,.0f} | 1.00x |")
    print(f"| student, teacher from cache | {cached:,.0f} | {cached / online:.2f}x |")
    print(f"cache: {manifest['bytes_per_answer_token']:.1f} bytes per answer token")


def _answer_tokens(dataset) -> int:
    return sum(sum(label != -100 for label in labels[1:]) for labels in dataset["labels"])


if __name__ == "__main__":
    main()
