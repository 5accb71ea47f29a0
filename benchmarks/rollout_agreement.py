"""Greedy rollouts of a real model with a trained adapter: a vLLM rollout server (the adapter synced the way
``--rollout_server`` syncs it) against the transformers engine, token for token, with the largest gap between the
two engines' log-probabilities of the tokens they chose.

    python benchmarks/rollout_agreement.py --model models/smollm2-135m --adapter runs/smollm2-lora/adapter
    python benchmarks/rollout_agreement.py ... --vllm_python PY          # vLLM's GPU build (bf16 there: expect gaps)

The prompts are the first user turns of ``--dataset`` (default: the demo corpus), rendered with the model's chat
template; answers stop at the template's end-of-turn token or after ``--new_tokens``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmneo.adapters.lora import mutates_base
from llmneo.adapters.store import load_adapter
from llmneo.data.formats import detect_format, row_to_messages
from llmneo.data.tokenize import encode_messages
from llmneo.rollout_engines import VLLM_LORA_RANKS, AdapterSync, ServedEngine, TransformersEngine, served_rank
from llmneo.rollouts import RolloutSettings, padding_id, stop_token_ids
from llmneo.server_client import ServerSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from vllm_server import VllmServer  # noqa: E402  (the tests' server: own process group, killed at the end)

DEMO_CORPUS = Path(__file__).resolve().parents[1] / "src" / "llmneo" / "demo" / "corpus.jsonl"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the base model directory (what the server serves)")
    parser.add_argument("--adapter", required=True, help="a trained adapter directory (llm-neo's or PEFT's)")
    parser.add_argument("--dataset", default=str(DEMO_CORPUS), help="JSONL rows; their first user turns are the prompts")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument("--vllm_python", default=None, help="an interpreter with vLLM's GPU build; default the CPU build")
    return parser.parse_args(argv)


def first_prompts(path: str, tokenizer, count: int) -> list[list[int]]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()[:count]]
    fmt = detect_format(rows[0].keys(), path)
    prompts = []
    for row in rows:
        messages = row_to_messages(row, fmt)
        first = next(i for i, message in enumerate(messages) if message["role"] == "assistant")
        ids, labels = encode_messages(tokenizer, messages[:first + 1], 10**6)
        prompts.append(ids[:next(i for i, label in enumerate(labels) if label != -100)])
    return prompts


def main():
    args = parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), args.adapter).eval()
    if mutates_base(model.peft_config["default"]):
        sys.exit("this check takes an adapter on the original base (PiSSA/OLoRA adapters saved by llm-neo are)")
    config = model.peft_config["default"]
    rank = next(r for r in VLLM_LORA_RANKS if r >= served_rank(model))
    prompts = first_prompts(args.dataset, tokenizer, args.prompts)
    settings, stops = RolloutSettings(args.new_tokens, 0.0, 1.0, 0), stop_token_ids(tokenizer)
    seeds = list(range(len(prompts)))
    ours = TransformersEngine(settings, stops, padding_id(tokenizer)).generate(model, prompts, seeds, args.new_tokens)
    with tempfile.TemporaryDirectory() as scratch:
        server = VllmServer(args.model, None, "--max-model-len", "2048", log=Path(scratch) / "vllm.log",
                            python=args.vllm_python, lora_rank=rank).start()
        try:
            served = ServedEngine(settings, stops, ServerSettings(server.url, option="--rollout_server"),
                                  AdapterSync(Path(scratch), name="agreement"))
            served.start(model)
            served.before_step(model, 0)
            theirs = served.generate(model, prompts, seeds, args.new_tokens)
            sync = served.figures()
        finally:
            server.stop()
    print(f"{args.model} + {args.adapter} (r={config.r}), {len(prompts)} prompts, greedy, up to {args.new_tokens} "
          f"new tokens; adapter sync {sync['rollout_sync_s']:.2f} s, {sync['rollout_adapter_bytes'] / 2**20:.2f} MiB")
    print("| prompt | tokens (transformers / vLLM) | equal | first difference | max log-prob gap |")
    print("|---|---|---|---|---|")
    for index, (mine, served_answer, mine_lp, served_lp) in enumerate(
            zip(ours.tokens, theirs.tokens, ours.log_probs, theirs.log_probs, strict=True)):
        common = next((t for t, (a, b) in enumerate(zip(mine, served_answer, strict=False)) if a != b), min(len(mine), len(served_answer)))
        gap = max((abs(a - b) for a, b in zip(mine_lp[:common], served_lp[:common], strict=False)), default=0.0)
        equal = mine == served_answer
        print(f"| {index} | {len(mine)} / {len(served_answer)} | {'yes' if equal else 'no'} | "
              f"{'' if equal else common} | {gap:.2e} |")
    agree = sum(a == b for a, b in zip(ours.tokens, theirs.tokens, strict=True))
    print(f"equal answers: {agree} of {len(prompts)}")
    print(f"first answer: {tokenizer.decode(theirs.tokens[0])!r}")


if __name__ == "__main__":
    main()
