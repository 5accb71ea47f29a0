"""Training throughput of the four methods through the real TokenDistillTrainer, next to a naive transformers+PEFT loop.

    python benchmarks/throughput.py                                  # CPU: small shapes, a few steps
    python benchmarks/throughput.py --preset llama --shapes 4x2048,16x512 --steps 8   # H100: reference shapes

Reference shapes (`--preset llama`): Llama-3.1-8B teacher, Llama-3.2-1B student (V = 128,256), LoRA r = 128 on
all linear layers, bf16, random-initialised (throughput and memory do not depend on weight values). Every row
trains the same synthetic rows (random ids, lengths uniform in [seq/2, seq], the first quarter a prompt) with
the same micro-batch and no accumulation, so tokens per optimizer step are equal; tokens/s counts the tokens of
the micro-batches (padding excluded) and skips the first step. The naive loop is written here: teacher forward
under no_grad, student forward, fp32 CE + full-vocabulary KL over the full upcast logits, backward, AdamW
(fused on CUDA). MFU is against 790 TFLOP/s (H100 bf16 dense), with FLOPs by formula: 2·P_teacher (forward) +
6·P_student (full fine-tune) or 4·P_student (adapter: no weight gradients) per token, attention excluded; cache
rows drop the teacher term. Peak memory: CUDA max allocated, or process peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import PRESETS, StepClock, build_llama, padding_collator, parameter_count, synthetic_rows

from llmneo.adapters.lora import add_lora
from llmneo.config import AdapterArguments, NeoTrainingArguments
from llmneo.data.packing import PackingCollator
from llmneo.runtime.memory import PeakMemory
from llmneo.teacher.cache import TeacherCache
from llmneo.teacher.capture import CaptureJob, CaptureSettings, write_cache
from llmneo.teacher.sources import CachedTeacher, OnlineTeacher
from llmneo.training import TokenDistillTrainer

PEAK_TFLOPS = 790.0
# (label, method, options): the levers, each switched on against the plain neo row.
ROWS = [
    ("neo (fused head)", "neo", {}),
    ("neo, naive loss", "neo", {"loss_impl": "naive"}),
    ("neo, packing", "neo", {"packing": True}),
    ("neo, activation checkpointing", "neo", {"activation_checkpointing": True}),
    ("neo, torch.compile", "neo", {"torch_compile": True}),
    ("neo, Liger kernels", "neo", {"use_liger_kernel": True}),
    ("neo, teacher cache (top-64)", "neo", {"cache": True}),
    ("lora", "lora", {}),
    ("kd", "kd", {}),
    ("sft", "sft", {}),
]


def naive_loop(teacher, student, batches, device) -> None:
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=device.type == "cuda")
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits.float()
        student_logits = student(**inputs).logits.float()
        mask = batch["labels"][:, 1:] != -100
        rows, reference = student_logits[:, :-1][mask], teacher_logits[:, :-1][mask]
        ce = F.cross_entropy(rows, batch["labels"][:, 1:][mask])
        kd = F.kl_div(F.log_softmax(rows, -1), F.log_softmax(reference, -1), reduction="batchmean", log_target=True)
        (0.5 * ce + 0.5 * kd).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        yield


def measure_naive(teacher, preset, dataset, batch, steps, device, checkpointing=False):
    student = add_lora(build_llama(preset["vocab"], preset["student"], preset["dtype"], seed=2),
                       AdapterArguments(lora_r=preset["rank"])).to(device)
    if checkpointing:  # the anchors' plain loop at 4x2048 (it runs out of memory without)
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    collator = padding_collator()
    batches = [collator([dataset[i] for i in range(s * batch, (s + 1) * batch)]) for s in range(steps)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    with PeakMemory() as memory:
        loop = naive_loop(teacher, student, batches, device)
        next(loop)  # warm-up step
        started = time.perf_counter()
        for _ in loop:
            pass
        seconds = time.perf_counter() - started
    return tokens / seconds, memory.peak_bytes


def measure_trainer(method, options, teacher, preset, dataset, batch, steps, device, scratch):
    options = dict(options)
    use_cache, packing = options.pop("cache", False), options.pop("packing", False)
    student = build_llama(preset["vocab"], preset["student"], preset["dtype"], seed=2)
    if method in ("lora", "neo"):
        student = add_lora(student, AdapterArguments(lora_r=preset["rank"]))
    side = {}
    if method in ("kd", "neo"):
        side = {"signal": CachedTeacher(TeacherCache(scratch / "cache"), preset["vocab"]) if use_cache
                else OnlineTeacher(teacher, None)}
    args = NeoTrainingArguments(
        output_dir=str(scratch / "run"), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
        logging_steps=10**6, report_to=[], disable_tqdm=True, save_strategy="no", seed=0,
        bf16=preset["dtype"] == torch.bfloat16, remove_unused_columns=False, dataloader_drop_last=True,
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        include_num_input_tokens_seen="non_padding", **options)
    collator = PackingCollator("sdpa") if packing else padding_collator()
    clock = StepClock()
    trainer = TokenDistillTrainer(model=student, args=args, train_dataset=dataset, data_collator=collator, callbacks=[clock],
                         **side)
    with PeakMemory() as memory:
        trainer.train()
    del trainer, student
    gc.collect()
    return clock.tokens_per_second(), memory.peak_bytes


def flops_per_token(preset, method, cached) -> float:
    teacher = 0 if (cached or method in ("sft", "lora")) else 2 * parameter_count(preset["teacher"], preset["vocab"])
    student = (6 if method in ("sft", "kd") else 4) * parameter_count(preset["student"], preset["vocab"])
    return teacher + student


def available(options, device) -> str | None:
    if options.get("use_liger_kernel"):
        import importlib.util

        if device.type != "cuda" or importlib.util.find_spec("liger_kernel") is None:
            return "needs CUDA and liger-kernel"
    if options.get("torch_compile") and device.type != "cuda":
        return "skipped on CPU (compile time dominates a short run)"
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="llama" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", help="micro-batch x sequence length, comma-separated (default: the preset's)")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    try:
        args.shapes = [tuple(map(int, shape.split("x"))) for shape in
                       (args.shapes or f"{preset['batch']}x{preset['seq']}").split(",")]
    except ValueError:
        parser.error(f"--shapes takes BATCHxSEQ[,BATCHxSEQ...], got {args.shapes}")
    return args


def main():
    args = parse_args()
    preset, shapes = PRESETS[args.preset], args.shapes
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = build_llama(preset["vocab"], preset["teacher"], preset["dtype"], seed=1).eval().requires_grad_(False)
    teacher = teacher.to(device)
    print(f"preset {args.preset} on {device}: teacher {preset['teacher']}, student {preset['student']} "
          f"(hidden, layers, heads, intermediate), V={preset['vocab']}, LoRA r={preset['rank']}, {args.steps} steps")
    print("| run | batch x seq | tokens/s | peak GiB | MFU | vs naive |")
    print("|---|---|---|---|---|---|")
    for batch, seq in shapes:
        dataset = synthetic_rows(batch * args.steps, seq, preset["vocab"], variable=True)
        naive = None  # the first naive loop that fits is the reference of the shape's ratios
        for label, checkpointing in (("naive loop (neo)", False), ("naive loop (neo), activation checkpointing", True)):
            measured = within_memory(measure_naive, teacher, preset, dataset, batch, args.steps, device, checkpointing)
            naive = naive or (measured and measured[0])
            print_row(label, batch, seq, measured, flops_per_token(preset, "neo", False), naive)
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            write_cache(scratch / "cache", CaptureJob(teacher, dataset, padding_collator(), CaptureSettings(top_k=64),
                                                      preset["vocab"]), {"data": {"rows": len(dataset), "answer_tokens": 0}})
            for label, method, options in ROWS:
                if reason := available(options, device):
                    print(f"| {label} | {batch}x{seq} | {reason} | | | |")
                    continue
                measured = within_memory(measure_trainer, method, options, teacher, preset, dataset, batch, args.steps,
                                         device, scratch)
                print_row(label, batch, seq, measured, flops_per_token(preset, method, options.get("cache", False)),
                          naive)


def within_memory(measure, *args):
    """(tokens/s, peak bytes), or None where the row runs out of GPU memory (the next row starts clean)."""
    try:
        return measure(*args)
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return None


def print_row(label, batch, seq, measured, flops, naive) -> None:
    if measured is None:
        print(f"| {label} | {batch}x{seq} | out of memory | | | |", flush=True)
        return
    speed, peak = measured
    ratio = f"{speed / naive:.2f}x" if naive else ""
    print(f"| {label} | {batch}x{seq} | {speed:,.0f} | {peak / 2**30:.2f} | {flops * speed / 1e12 / PEAK_TFLOPS:.1%} | "
          f"{ratio} |", flush=True)


if __name__ == "__main__":
    main()
