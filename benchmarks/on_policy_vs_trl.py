"""On-policy distillation beside TRL's DistillationTrainer: the same student, teacher, prompts, rollout length and
divergence, in one run.

    pip install --no-deps trl==1.16.0      # in the venv of the README's install (its pins agree with llm-neo's)
    python benchmarks/on_policy_vs_trl.py                  # CPU: small random-init Llamas, 64 new tokens, 6 steps
    python benchmarks/on_policy_vs_trl.py --steps 12 --new_tokens 128

Both trainers get a LoRA student (r = 16, α = 32, every linear layer but the head, no dropout), the same frozen
teacher, the same prompts (word-level tokenizer with a chat template, 4 prompts per step), sampling at T = 1 up to
the same number of new tokens (random weights rarely sample EOS, so answers run to the budget on both sides), forward
KL at T = 1 (TRL's generalized JSD with β = 0), the same learning rate and constant schedule. TRL generates with
transformers' ``generate`` (its non-vLLM path) and computes its chunked divergence from both models' hidden states;
llm-neo with its own KV-cached sampler and its fused head.

Each trainer runs in its own subprocess (peak RSS is that process's, models included). Reported per trainer:
seconds per step (all steps), rollout tokens/s (generated tokens over generation time), training tokens/s (prompt +
answer tokens over the step time outside generation), peak RSS, and after the same number of steps the same
on-policy evaluation of the student (llm-neo's ``evaluate_on_policy`` on held-out prompts). A last subprocess times
the KD part alone: TRL's ``_chunked_divergence_loss`` against llm-neo's fused loss on the same hidden states and
heads, forward and backward.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import PRESETS, StepClock, build_llama, word_tokenizer

from llmneo.data.tokenize import FALLBACK_CHAT_TEMPLATE, encode_messages

RANK, ALPHA, PROMPT_WORDS = 16, 32, 48
LEARNING_RATE = 1e-4  # as common.train_steps sets it for llm-neo


def tokenizer_for(preset):
    tokenizer = word_tokenizer(preset["vocab"])
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def prompts(count: int, vocab: int, seed: int) -> list[list[dict]]:
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(3, vocab, (count, PROMPT_WORDS), generator=generator).tolist()
    return [[{"role": "user", "content": " ".join(f"t{word}" for word in row)}] for row in words]


def models(preset):
    """The frozen teacher and the student base, each with a KV cache for generation."""
    teacher = build_llama(preset["vocab"], preset["teacher"], preset["dtype"], seed=1).eval().requires_grad_(False)
    student = build_llama(preset["vocab"], preset["student"], preset["dtype"], seed=2)
    for model in (teacher, student):
        model.config.use_cache = model.generation_config.use_cache = True
    return teacher, student


def held_out_rows(tokenizer, preset, count: int) -> list[dict]:
    """Held-out prompts as llm-neo rows (prompt, then a one-token answer the evaluation replaces)."""
    rows = []
    for messages in prompts(count, preset["vocab"], seed=99):
        ids, labels = encode_messages(tokenizer, [*messages, {"role": "assistant", "content": "t3"}], 10**6)
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def evaluate(student, teacher, tokenizer, preset, args) -> dict:
    from llmneo.evaluation.on_policy import OnPolicyEvalOptions, evaluate_on_policy

    options = OnPolicyEvalOptions(max_new_tokens=args.new_tokens, bootstrap=0, shown=0)
    found = evaluate_on_policy(student, teacher, tokenizer, held_out_rows(tokenizer, preset, args.eval_prompts), options)
    return {key: value for key, value in found.items() if isinstance(value, float)}


def run_llmneo(preset, args, out: Path) -> dict:
    from datasets import Dataset

    from llmneo.adapters.lora import add_lora
    from llmneo.config import AdapterArguments
    from llmneo.teacher.sources import OnlineTeacher
    from common import padding_collator, train_steps

    tokenizer = tokenizer_for(preset)
    teacher, student = models(preset)
    student = add_lora(student, AdapterArguments(lora_r=RANK, lora_alpha=ALPHA, lora_dropout=0.0))
    rows = [encode_messages(tokenizer, [*messages, {"role": "assistant", "content": "t3"}], 10**6)
            for messages in prompts(args.steps * preset["batch"], preset["vocab"], seed=0)]
    dataset = Dataset.from_dict({"input_ids": [ids for ids, _ in rows], "labels": [labels for _, labels in rows],
                                 "row_id": list(range(len(rows)))})
    trainer, clock = train_steps(student, dataset, padding_collator(), preset, args.steps, out,
                                 OnlineTeacher(teacher, None), tokenizer=tokenizer, on_policy_fraction=1.0,
                                 rollout_max_new_tokens=args.new_tokens, rollout_temperature=1.0,
                                 divergence="forward_kl", temperature=1.0,
                                 lr_scheduler_type="constant", warmup_steps=0)
    stats = trainer.on_policy.rollouts.stats
    prompt_tokens = sum(len(ids) - 1 for ids, _ in rows)  # the prompt: every token but the answer's
    return {**figures(clock, stats.seconds, stats.tokens, prompt_tokens, args),
            "eval": evaluate(trainer.model, teacher, tokenizer, preset, args)}


def run_trl(preset, args, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DistillationConfig, DistillationTrainer

    class TimedDistillationTrainer(DistillationTrainer):
        """TRL's trainer, its generation timed and its completion tokens counted."""

        rollout_s, rollout_tokens = 0.0, 0

        def _generate(self, prompts):
            started = time.perf_counter()
            found = super()._generate(prompts)
            self.rollout_s += time.perf_counter() - started
            return found

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            self.rollout_tokens += int(output["completion_mask"].sum())
            return output

    tokenizer = tokenizer_for(preset)
    teacher, student = models(preset)
    train = prompts(args.steps * preset["batch"], preset["vocab"], seed=0)
    config = DistillationConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=preset["batch"],
                                learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0,
                                max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
                                logging_steps=10**6, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
                                bf16=preset["dtype"] == torch.bfloat16, use_cpu=not torch.cuda.is_available())
    clock = StepClock()
    trainer = TimedDistillationTrainer(model=student, teacher_model=teacher, args=config,
                                       train_dataset=Dataset.from_dict({"prompt": train}), processing_class=tokenizer,
                                       peft_config=LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                              target_modules="all-linear"),
                                       callbacks=[clock])
    trainer.train()
    prompt_tokens = sum(len(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True)) for p in train)
    return {**figures(clock, trainer.rollout_s, trainer.rollout_tokens, prompt_tokens, args),
            "eval": evaluate(trainer.model, teacher, tokenizer, preset, args)}


def figures(clock: StepClock, rollout_s: float, rollout_tokens: int, prompt_tokens: int, args) -> dict:
    step = clock.seconds_per_step()
    train_s = step * args.steps - rollout_s
    return {"s_per_step": step, "rollout_tokens_per_s": rollout_tokens / rollout_s,
            "training_tokens_per_s": (prompt_tokens + rollout_tokens) / train_s, "rollout_tokens": rollout_tokens,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def time_kd_parts(preset, args) -> dict:
    """Forward + backward of the KD term alone on the same hidden states and heads (forward KL, T = 1)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from llmneo.losses.contract import LossSettings
    from llmneo.losses.divergences import get_divergence
    from llmneo.losses.fused import fused_distillation_loss

    torch.manual_seed(0)
    rows, tokens = preset["batch"], args.new_tokens
    vocab, s_hidden, t_hidden = preset["vocab"], preset["student"][0], preset["teacher"][0]
    student_weight = torch.randn(vocab, s_hidden, dtype=preset["dtype"]) * 0.02
    teacher_weight = torch.randn(vocab, t_hidden, dtype=preset["dtype"]) * 0.02
    student_hidden = torch.randn(rows, tokens + 1, s_hidden, dtype=preset["dtype"])
    teacher_hidden = torch.randn(rows, tokens + 1, t_hidden, dtype=preset["dtype"])
    labels = torch.randint(0, vocab, (rows, tokens + 1))
    labels[:, 0] = -100  # llm-neo shifts: positions 0..tokens-1 predict the answer's tokens 1..tokens
    mask = torch.ones(rows, tokens)
    settings = LossSettings(alpha=0.0, temperature=1.0, divergence=get_divergence("forward_kl"))

    def ours(hidden):
        return fused_distillation_loss(hidden, student_weight, labels, teacher_hidden, teacher_weight,
                                       settings=settings).loss

    def theirs(hidden):
        return _chunked_divergence_loss(hidden[:, :-1], teacher_hidden[:, :-1], student_weight, teacher_weight, mask,
                                        beta=0.0)[0]

    timings, values = {}, {}
    for name, loss in (("llm-neo", ours), ("trl", theirs)):
        seconds = []
        for _ in range(args.repeats + 1):  # the first is warm-up
            hidden = student_hidden.clone().requires_grad_()
            started = time.perf_counter()
            value = loss(hidden)
            value.backward()
            seconds.append(time.perf_counter() - started)
        timings[name], values[name] = statistics.median(seconds[1:]), float(value)
    return {"kd_s": timings, "kd_value": values, "kd_tokens": rows * tokens}


PARTS = {"llm-neo": run_llmneo, "trl": run_trl}


def child(args) -> None:
    preset = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as scratch:
        found = time_kd_parts(preset, args) if args.part == "kd" else PARTS[args.part](preset, args, Path(scratch))
    print("RESULT " + json.dumps(found), flush=True)


def measured(part: str, args) -> dict:
    command = [sys.executable, __file__, "--part", part, "--preset", args.preset, "--steps", str(args.steps),
               "--new_tokens", str(args.new_tokens), "--eval_prompts", str(args.eval_prompts),
               "--repeats", str(args.repeats)]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"the {part} part failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def report(results: dict, args) -> None:
    preset = PRESETS[args.preset]
    neo, trl, kd = results["llm-neo"], results["trl"], results["kd"]
    print(f"preset {args.preset}: teacher {preset['teacher']}, student {preset['student']} (hidden, layers, heads, "
          f"intermediate), V={preset['vocab']}, {preset['batch']} prompts/step, {args.new_tokens} new tokens, "
          f"LoRA r={RANK}, {args.steps} steps, forward KL, T=1; on-policy eval on {args.eval_prompts} held-out prompts")
    print("| | s/step | rollout tokens/s | training tokens/s | peak RSS (GiB) | on-policy reverse KL | "
          "teacher NLL/token |")
    print("|---|---|---|---|---|---|---|")
    for name, row in (("llm-neo", neo), ("TRL 1.16 DistillationTrainer", trl)):
        print(f"| {name} | {row['s_per_step']:.3f} | {row['rollout_tokens_per_s']:,.0f} | "
              f"{row['training_tokens_per_s']:,.0f} | {row['peak_rss_gib']:.2f} | "
              f"{row['eval']['on_policy_reverse_kl']:.4f} | {row['eval']['teacher_nll_per_token']:.3f} |")
    print(f"| llm-neo / TRL | {trl['s_per_step'] / neo['s_per_step']:.2f}x faster | "
          f"{neo['rollout_tokens_per_s'] / trl['rollout_tokens_per_s']:.2f}x | "
          f"{neo['training_tokens_per_s'] / trl['training_tokens_per_s']:.2f}x | "
          f"{neo['peak_rss_gib'] / trl['peak_rss_gib']:.2f}x | | |")
    seconds = kd["kd_s"]
    print(f"\nKD part alone ({kd['kd_tokens']} answer tokens, forward + backward, median of {args.repeats}): "
          f"llm-neo fused {seconds['llm-neo'] * 1e3:.1f} ms, TRL chunked divergence {seconds['trl'] * 1e3:.1f} ms: "
          f"{seconds['trl'] / seconds['llm-neo']:.2f}x; values {kd['kd_value']['llm-neo']:.6f} and "
          f"{kd['kd_value']['trl']:.6f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="llama" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--eval_prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of the KD part")
    parser.add_argument("--part", choices=["llm-neo", "trl", "kd"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if args.part:
        return child(args)
    report({part: measured(part, args) for part in ("llm-neo", "trl", "kd")}, args)


if __name__ == "__main__":
    main()
