"""KD head benchmark: forward+backward time, peak extra memory and effective TFLOP/s of the loss implementations.

    python benchmarks/loss_head.py                 # GPU: the reference shapes; CPU: small shapes
    python benchmarks/loss_head.py --tokens 8192 --student_hidden 2048 --teacher_hidden 4096 --vocab 128256

Each row takes both models' final hidden states for ``tokens`` answer positions and produces the loss
alpha * CE + (1 - alpha) * T^2 * D and the gradient w.r.t. the student's hidden states (the head is frozen, as in
lora/neo, unless --train_head). Implementations:
- naive:     textbook loop: full logits of both models upcast to fp32, F.cross_entropy + F.kl_div (forward KL only);
- neo-naive: llm-neo's --loss_impl naive (full logits in the model dtype, fp32 per chunk of answer rows);
- fused:     llm-neo's --loss_impl fused (losses/fused.py);
- liger:     Liger-Kernel's LigerFusedLinearJSDLoss through --loss_impl liger (when importable).
FLOPs count the three (four with --train_head) head matmuls, 2·N·V·H each, as in shared/anchors.md; the softmax
work is not counted. Peak memory is CUDA's max allocated on a GPU and peak RSS on CPU, minus what was allocated
before the call. Ratios are within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from llmneo.losses.contract import LossSettings
from llmneo.losses.reference import distillation_loss
from llmneo.losses.divergences import get_divergence
from llmneo.losses.fused import fused_distillation_loss
from llmneo.losses.liger import liger_distillation_loss, liger_unavailable_reason
from llmneo.runtime.memory import PeakMemory

GPU_SHAPES = {"student_hidden": [2048, 4096], "teacher_hidden": [4096], "vocab": 128256, "tokens": [1024, 8192, 16384]}
CPU_SHAPES = {"student_hidden": [128], "teacher_hidden": [256], "vocab": 32000, "tokens": [1024, 4096]}


def textbook_naive(case, settings):
    student = F.linear(case["hidden"][0, :-1], case["weight"]).float()
    with torch.no_grad():
        teacher = F.linear(case["teacher_hidden"][0, :-1], case["teacher_weight"]).float()
    temperature, alpha = settings.temperature, settings.alpha
    ce = F.cross_entropy(student, case["labels"][0, 1:])
    kd = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                  reduction="batchmean", log_target=True) * temperature**2
    return alpha * ce + (1 - alpha) * kd


def neo_naive(case, settings):
    with torch.no_grad():
        teacher = F.linear(case["teacher_hidden"], case["teacher_weight"])
    return distillation_loss(F.linear(case["hidden"], case["weight"]), case["labels"], teacher, settings=settings).loss


def fused(case, settings):
    return fused_distillation_loss(case["hidden"], case["weight"], case["labels"], case["teacher_hidden"],
                                   case["teacher_weight"], settings=settings).loss


def liger(case, settings):
    return liger_distillation_loss(case["hidden"], case["weight"], case["labels"], case["teacher_hidden"],
                                   case["teacher_weight"], settings=settings).loss


IMPLEMENTATIONS = {"naive": textbook_naive, "neo-naive": neo_naive, "fused": fused, "liger": liger}


def make_case(tokens, student_hidden, teacher_hidden, vocab, dtype, device, train_head):
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)

    labels = torch.randint(0, vocab, (1, tokens + 1), generator=generator, device=device)
    labels[0, 0] = -100
    return {"hidden": randn(1, tokens + 1, student_hidden).requires_grad_(True),
            "weight": randn(vocab, student_hidden, scale=student_hidden**-0.5).requires_grad_(train_head),
            "teacher_hidden": randn(1, tokens + 1, teacher_hidden),
            "teacher_weight": randn(vocab, teacher_hidden, scale=teacher_hidden**-0.5),
            "labels": labels}


def measure(function, case, settings, device, repeats):
    """Median seconds of forward+backward, and the peak extra bytes of one call."""
    times = []
    for attempt in range(repeats + 1):
        case["hidden"].grad = None
        case["weight"].grad = None
        with PeakMemory(cuda=device.type == "cuda") as memory:
            started = time.perf_counter()
            function(case, settings).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
        if attempt:  # the first call warms up
            times.append(elapsed)
    return statistics.median(times), memory.extra_bytes


def head_flops(tokens, student_hidden, teacher_hidden, vocab, train_head):
    student_matmuls = 3 if train_head else 2  # logits, grad to hidden (, grad to weight)
    return 2 * tokens * vocab * (student_matmuls * student_hidden + teacher_hidden)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--student_hidden", type=int, nargs="+")
    parser.add_argument("--teacher_hidden", type=int, nargs="+")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
    parser.add_argument("--divergence", default="forward_kl")
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--train_head", action="store_true", help="also compute the head weight's gradient")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    defaults = GPU_SHAPES if args.device.startswith("cuda") else CPU_SHAPES
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def available(name, args):
    if name == "naive" and args.divergence != "forward_kl":
        return "the textbook loop is forward KL only"
    if name == "liger":
        return liger_unavailable_reason(get_divergence(args.divergence), args.vocab, args.vocab)
    return None


def run(args):
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    settings = LossSettings(alpha=args.alpha, temperature=args.temperature, chunk_size=args.chunk_size,
                            divergence=get_divergence(args.divergence))
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {dtype}, "
          f"V={args.vocab}, divergence {args.divergence}, chunk {args.chunk_size}, head "
          f"{'trained' if args.train_head else 'frozen'}, median of {args.repeats}")
    print("| impl | H student | H teacher | tokens | ms fwd+bwd | extra MiB | TFLOP/s | time vs naive | memory vs naive |")
    print("|---|---|---|---|---|---|---|---|---|")
    for student_hidden in args.student_hidden:
        for teacher_hidden in args.teacher_hidden:
            for tokens in args.tokens:
                case = make_case(tokens, student_hidden, teacher_hidden, args.vocab, dtype, device, args.train_head)
                flops = head_flops(tokens, student_hidden, teacher_hidden, args.vocab, args.train_head)
                reference = None
                for name in args.implementations:
                    if reason := available(name, args):
                        print(f"| {name} | {student_hidden} | {teacher_hidden} | {tokens} | skipped: {reason} |||||")
                        continue
                    torch._dynamo.reset()  # Liger compiles its chunk step: a new shape's recompile fails on torch 2.11
                    try:
                        seconds, peak = measure(IMPLEMENTATIONS[name], case, settings, device, args.repeats)
                    except torch.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        print(f"| {name} | {student_hidden} | {teacher_hidden} | {tokens} | out of memory |||||")
                        continue
                    reference = reference or (seconds, peak)
                    print(f"| {name} | {student_hidden} | {teacher_hidden} | {tokens} | {seconds * 1e3:.1f} | "
                          f"{peak / 2**20:.0f} | {flops / seconds / 1e12:.2f} | {seconds / reference[0]:.2f}x | "
                          f"{100 * (1 - peak / reference[1]):.0f}% less |", flush=True)
                del case
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def main():
    args = parse_args()
    # On CPU, freed buffers must return to the OS for peak RSS to measure live memory: make large allocations
    # their own mappings (glibc reads this variable at start-up, hence the re-exec).
    if not args.device.startswith("cuda") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    run(args)


if __name__ == "__main__":
    main()
