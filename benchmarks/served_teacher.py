"""A teacher served by vLLM beside the local teacher: capture tokens/s and the student's step time.

    python benchmarks/served_teacher.py                    # CPU: small random-init Llamas, vLLM's CPU build
    python benchmarks/served_teacher.py --preset llama \\
        --vllm_python python3                              # GPU: Llama-3.1-8B teacher shape, vLLM's GPU build

Capture: the same rows through the local teacher (`cache-teacher`'s path, one forward per batch) and through the
server with 1, 4 and 16 rows in flight (`cache-teacher --teacher_server`'s path); tokens/s counts every token of
the rows. Student: the same LoRA student (neo, fused loss, top-k KD term) trained with the teacher online, from the
local cache and from the server (`distill --teacher_server`: each batch's rows requested when it is collated);
the step time skips the first step, and the server run's mean wait for the teacher per step is printed beside it.
The server starts once (not timed). On CPU the teacher's weights are saved and served, so the served cache is
checked against the local one; at the GPU preset vLLM serves random weights (``--load-format dummy``: saving 16 GB
is not the point), so only the throughput compares.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import PRESETS, build_llama, padding_collator, synthetic_rows, train_steps, word_tokenizer

from llmneo.adapters.lora import add_lora
from llmneo.config import AdapterArguments
from llmneo.teacher.cache import TeacherCache
from llmneo.teacher.capture import CaptureJob, CaptureSettings, write_cache, write_served_cache
from llmneo.teacher.server import ServerSettings, TeacherServer
from llmneo.teacher.sources import CachedTeacher, OnlineTeacher, ServedTeacher

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from vllm_server import VllmServer  # noqa: E402  (the tests' server: own process group, killed at the end)

CONCURRENCY = (1, 4, 16)


def serve(teacher, tokenizer, preset, args, scratch: Path) -> VllmServer:
    model_dir = scratch / "teacher"
    if args.dummy_weights:
        teacher.config.save_pretrained(model_dir)
        load = ["--load-format", "dummy"]
    else:
        teacher.save_pretrained(model_dir)
        load = []
    tokenizer.save_pretrained(model_dir)
    dtype = "bfloat16" if preset["dtype"] == torch.bfloat16 else "float32"
    # On one GPU the trainer (the local teacher, the student) shares the device with vLLM.
    memory = ["--gpu-memory-utilization", "0.35"] if torch.cuda.is_available() else []
    return VllmServer(str(model_dir), None, "--dtype", dtype, "--max-model-len", str(preset["seq"] + 64), *load,
                      *memory, *args.vllm_arg, log=scratch / "vllm.log", python=args.vllm_python).start()


def check_vllm(python: str | None) -> None:
    if python is not None and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode != 0:
        sys.exit(f"vLLM is not installed for {python}: install its GPU build there (pip install vllm), or leave "
                 "--vllm_python out to use scripts/vllm_cpu_server.sh")


def capture(cache_dir, write, rows) -> tuple[float, dict]:
    started = time.perf_counter()
    manifest = write(cache_dir)
    return rows / (time.perf_counter() - started), manifest


def step_seconds(student, dataset, collator, preset, steps, out, signal) -> float:
    _, clock = train_steps(student, dataset, collator, preset, steps, out, signal)
    steps, seconds = clock.seconds_after_first()
    return seconds / steps


def agreement(local: Path, served: Path, rows: int) -> str:
    """How the served cache compares with the local one (same weights): top-k ids and log-probabilities."""
    a, b = TeacherCache(local).rows(range(rows)), TeacherCache(served).rows(range(rows))
    same = (a.token_ids[:, 0] == b.token_ids[:, 0]).float().mean().item()
    difference = (a.log_probs.float() - b.log_probs.float()).abs().max().item()
    return f"served vs local cache: top-1 ids equal at {same:.1%} of positions, log-probs max |diff| {difference:.2e}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="llama" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=None, help="capture rows (default 8 batches)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--vllm_python", default=None,
                        help="an interpreter with vLLM installed (its GPU build); default scripts/vllm_cpu_server.sh")
    parser.add_argument("--dummy_weights", action=argparse.BooleanOptionalAction, default=None,
                        help="serve random weights (--load-format dummy); default at the llama preset")
    parser.add_argument("--vllm_arg", action="append", default=[], help="a further vLLM option (repeatable)")
    args = parser.parse_args(argv)
    if args.dummy_weights is None:
        args.dummy_weights = args.preset == "llama"
    return args


def main():
    args = parse_args()
    check_vllm(args.vllm_python)
    preset = PRESETS[args.preset]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab, seq, batch = preset["vocab"], preset["seq"], preset["batch"]
    rows = args.rows or 8 * batch
    dataset = synthetic_rows(max(rows, args.steps * batch), seq, vocab)
    capture_rows = dataset.select(range(rows))
    tokenizer, collator = word_tokenizer(vocab), padding_collator()
    settings = CaptureSettings(top_k=args.top_k, batch_size=batch, cache_dtype="float32")
    teacher = build_llama(vocab, preset["teacher"], preset["dtype"], seed=1).eval().requires_grad_(False)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        vllm = serve(teacher, tokenizer, preset, args, scratch)
        try:
            server, served_fingerprint = TeacherServer.open(ServerSettings(vllm.url), tokenizer, args.top_k, "--top_k")
            fingerprint = {"served_teacher": served_fingerprint}
            teacher.to(device)
            local, _ = capture(scratch / "local", lambda out: write_cache(
                out, CaptureJob(teacher, capture_rows, collator, settings, vocab), {"data": {"rows": rows}}), rows * seq)
            served = {}
            for n in CONCURRENCY:
                served[n], _ = capture(scratch / f"served-{n}", lambda out, n=n: write_served_cache(
                    out, CaptureJob(server, capture_rows, None, settings, vocab), {"data": {"rows": rows}, **fingerprint},
                    n),
                    rows * seq)
            check = None if args.dummy_weights else agreement(scratch / "local", scratch / "served-1", rows)
            train = dataset.select(range(args.steps * batch))
            write_cache(scratch / "train-cache", CaptureJob(teacher, train, collator, settings, vocab),
                        {"data": {"rows": len(train)}})
            times = {}
            for name in ("online", "cache", "served"):
                student = add_lora(build_llama(vocab, preset["student"], preset["dtype"], seed=2),
                                   AdapterArguments(lora_r=preset["rank"]))
                signal = {"online": lambda: OnlineTeacher(teacher, None),
                          "cache": lambda: CachedTeacher(TeacherCache(scratch / "train-cache"), vocab),
                          "served": lambda: ServedTeacher(server, fingerprint, args.top_k, vocab, train)}[name]()
                run_collator = signal.collator(collator, tokenizer)
                times[name] = step_seconds(student, train, run_collator, preset, args.steps, scratch / name, signal)
                if name == "served":
                    wait = signal.waited / args.steps
                signal.close()
        finally:
            vllm.stop()
    print(f"preset {args.preset} on {device}: teacher {preset['teacher']}, student {preset['student']} "
          f"(hidden, layers, heads, intermediate), V={vocab}, rows of {seq} tokens, top-{args.top_k}, "
          f"{rows} capture rows, {args.steps} steps of {batch} rows, LoRA r={preset['rank']}; vLLM "
          f"{'random weights' if args.dummy_weights else 'the same weights'}")
    print("| phase | teacher | tokens/s | s/step | vs local |")
    print("|---|---|---|---|---|")
    print(f"| capture | local (one forward per {batch} rows) | {local:,.0f} | | 1.00x |")
    for n, value in served.items():
        print(f"| capture | served, {n} in flight | {value:,.0f} | | {value / local:.2f}x |")
    for name, label in (("online", "local, online"), ("cache", "local cache"), ("served", "served, fetched ahead")):
        print(f"| student step | {label} | {batch * seq / times[name]:,.0f} | {times[name]:.3f} | "
              f"{times['online'] / times[name]:.2f}x |")
    print(f"served run: the step waited {wait:.3f} s per step for the teacher (teacher_wait_s)")
    if check:
        print(check)


if __name__ == "__main__":
    main()
