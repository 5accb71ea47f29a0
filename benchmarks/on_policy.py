"""On-policy steps through the real TokenDistillTrainer: rollout tokens/s, training tokens/s, and the step beside an
off-policy step on the same rows.

    python benchmarks/on_policy.py                    # CPU: small random-init Llamas, 64 new tokens
    python benchmarks/on_policy.py --preset llama     # GPU: Llama-3.1-8B teacher, Llama-3.2-1B student, 256 new tokens
    python benchmarks/on_policy.py --vllm             # and the same on-policy steps with rollouts on a vLLM server
    python benchmarks/on_policy.py --preset llama --vllm --vllm_python PY   # GPU: vLLM's GPU build installed for PY

Rows are synthetic (random ids: a prompt, then as many answer tokens as a rollout's budget). Random weights rarely
sample EOS, so every answer runs to the token budget: the figures are for full-length answers. Rollout tokens/s counts generated
tokens over generation time (KV cache, batched, per-row seeded sampling at T = 1); training tokens/s counts the
on-policy batches' tokens (prompt + answer) over the step time outside generation. Times are means over all
steps, the first (warm-up) included, for both kinds of step.

With ``--vllm`` the student's base is saved and served by vLLM (scripts/vllm_rollout_server.sh: the CPU build, or
``--vllm_python``'s GPU build) and the same on-policy steps run with ``--rollout_server``: before each step the
adapter is written and loaded in place (sync s/step and MiB/step), then the step's prompts are sent at once. The
server and the trainer share the machine (on a GPU: the same device, vLLM held to a share of its memory).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import PRESETS, build_llama, padding_collator, synthetic_rows, train_steps, word_tokenizer

from llmneo.adapters.lora import add_lora
from llmneo.config import AdapterArguments
from llmneo.data.tokenize import FALLBACK_CHAT_TEMPLATE
from llmneo.rollout_engines import VLLM_LORA_RANKS
from llmneo.teacher.sources import OnlineTeacher

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from vllm_server import VllmServer  # noqa: E402  (the tests' server: own process group, killed at the end)

NEW_TOKENS = {"cpu": 64, "llama": 256}


def run(student, teacher, dataset, tokenizer, preset, args, out: Path, fraction: float, **options):
    trainer, clock = train_steps(student, dataset, padding_collator(), preset, args.steps, out,
                                 OnlineTeacher(teacher, None), tokenizer=tokenizer, on_policy_fraction=fraction,
                                 rollout_max_new_tokens=args.new_tokens, rollout_temperature=1.0, **options)
    return trainer, clock.seconds_per_step()  # all steps: the rollout figures cannot leave the first one out


def serve_student(student, tokenizer, preset, args, scratch: Path) -> VllmServer:
    """The student's base on a rollout server taking its adapter's rank."""
    base = scratch / "student-base"
    student.save_pretrained(base)
    tokenizer.save_pretrained(base)
    rank = next(r for r in VLLM_LORA_RANKS if r >= preset["rank"])
    prompt = preset["seq"] // 4
    extra = ["--max-model-len", str(prompt + args.new_tokens + 16)]
    if torch.cuda.is_available():  # the trainer's models share the device
        extra += ["--dtype", "bfloat16", "--gpu-memory-utilization", "0.3"]
    server = VllmServer(str(base), None, log=scratch / "vllm.log", python=args.vllm_python, lora_rank=rank)
    server.args = (*server.args, *extra)
    return server.start()


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
    parser.add_argument("--vllm", action="store_true", help="also the on-policy steps with rollouts on a vLLM server")
    parser.add_argument("--vllm_python", default=None,
                        help="an interpreter with vLLM's GPU build; default vLLM's CPU build (scripts/vllm_cpu_server.sh)")
    args = parser.parse_args(argv)
    args.new_tokens = args.new_tokens or NEW_TOKENS[args.preset]
    return args


def main():
    args = parse_args()
    if args.vllm_python is not None and subprocess.run([args.vllm_python, "-c", "import vllm"],
                                                       capture_output=True).returncode != 0:
        sys.exit(f"vLLM is not installed for {args.vllm_python}: install its GPU build there (pip install vllm)")
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
        for name, fraction in (("off", 0.0), ("on", 1.0), *((("vllm", 1.0),) if args.vllm else ())):
            base = build_llama(vocab, preset["student"], preset["dtype"], seed=2)
            options = {}
            if name == "vllm":
                server = serve_student(base, tokenizer, preset, args, Path(scratch))
                options = {"rollout_server": server.url}
            student = add_lora(base, AdapterArguments(lora_r=preset["rank"]))
            try:
                figures[name] = run(student, teacher, dataset, tokenizer, preset, args, Path(scratch) / name, fraction,
                                    **options)
            finally:
                if name == "vllm":
                    server.stop()
    print(f"preset {args.preset} on {device}: teacher {preset['teacher']}, student {preset['student']} "
          f"(hidden, layers, heads, intermediate), V={vocab}, {batch} rows of {prompt} prompt tokens, "
          f"{args.new_tokens} new tokens, LoRA r={preset['rank']}, {args.steps} steps, KD forward KL (full)")
    print("| step | rollout engine | s/step | rollout s/step | rollout tokens/s | training tokens/s | sync s/step | "
          "adapter MiB/step | answers cut |")
    print("|---|---|---|---|---|---|---|---|---|")
    off_step = figures["off"][1]
    print(f"| off-policy (dataset answers) | | {off_step:.3f} | | | {batch * (prompt + args.new_tokens) / off_step:,.0f} "
          "| | | |")
    for name, engine in (("on", "transformers"), ("vllm", "vLLM server")):
        if name in figures:
            print(on_policy_row(*figures[name], engine, batch, prompt, args.steps))


def on_policy_row(trainer, step_seconds: float, engine: str, batch: int, prompt: int, steps: int) -> str:
    stats = trainer.on_policy.rollouts.stats  # every step's rollouts, warm-up included
    rollout = stats.seconds / steps
    train_tokens = batch * (prompt + stats.tokens / max(stats.answers, 1))
    sync = trainer.on_policy.rollouts.engine.figures()  # never logged: every sync of the run, its start included
    synced = (f"{sync['rollout_sync_s'] / steps:.3f} | {sync['rollout_adapter_bytes'] / steps / 2**20:.2f}"
              if sync else "| ")
    return (f"| on-policy (full) | {engine} | {step_seconds:.3f} | {rollout:.3f} | {stats.tokens / stats.seconds:,.0f} | "
            f"{train_tokens / max(step_seconds - rollout, 1e-9):,.0f} | {synced} | {stats.cut / max(stats.answers, 1):.0%} |")


if __name__ == "__main__":
    main()
