"""`llm-neo` command line: every command is one call of the library."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import NeoError

COMMANDS = {
    "distill": "Distil a teacher into a student (methods sft, lora, kd, neo). `llm-neo distill --help` lists every option.",
    "cache-teacher": "Run the teacher once over the training data and store its top-k distributions for --teacher_cache.",
    "merge": "Merge a run's adapter into its base student and save a standalone model.",
    "export-lora": "Write a run's adapter as a plain PEFT LoRA (MoSLoRA's mixer folded into B) for any LoRA loader.",
    "demo": "Offline end-to-end demo on tiny models built from shipped text (2 CPU cores, < 5 minutes).",
}


def _usage() -> str:
    lines = ["usage: llm-neo COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<14} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def cmd_distill(argv: list[str]) -> int:
    from .config import parse_config
    from .pipeline import distill

    summary = distill(parse_config(argv))
    print(f"run written to {summary.run_dir} ({summary.steps} steps); weights in {summary.weights_dir}")
    return 0


def cmd_cache_teacher(argv: list[str]) -> int:
    from .config import parse_config
    from .pipeline import cache_teacher
    from .teacher.capture import CaptureSettings

    defaults = CaptureSettings()
    parser = argparse.ArgumentParser(prog="llm-neo cache-teacher", description=COMMANDS["cache-teacher"],
                                     epilog="Every other option is a `llm-neo distill` option (the run to cache for).",
                                     allow_abbrev=False)
    parser.add_argument("--cache_dir", required=True, help="Directory of the cache (created, or resumed if it exists).")
    parser.add_argument("--top_k", type=int, default=defaults.top_k, help="Teacher tokens kept per answer position.")
    parser.add_argument("--cache_dtype", default=defaults.cache_dtype, choices=["float16", "bfloat16", "float32"],
                        help="Storage dtype of the log-probabilities (float32 for exactness).")
    parser.add_argument("--shard_rows", type=int, default=defaults.shard_rows,
                        help="Dataset rows per shard (the unit of resumption).")
    parser.add_argument("--cache_batch_size", type=int, default=defaults.batch_size,
                        help="Rows per teacher forward pass.")
    args, rest = parser.parse_known_args(argv)
    settings = CaptureSettings(top_k=args.top_k, cache_dtype=args.cache_dtype, shard_rows=args.shard_rows,
                               batch_size=args.cache_batch_size)
    manifest = cache_teacher(parse_config(rest), args.cache_dir, settings)
    print(f"teacher cache written to {args.cache_dir}: {len(manifest['shards'])} shards, "
          f"{manifest['fingerprint']['data']['answer_tokens']} answer tokens, "
          f"{manifest['bytes_per_answer_token']:.1f} bytes per answer token")
    return 0


def cmd_merge(argv: list[str]) -> int:
    from .artifacts import merge_run

    parser = argparse.ArgumentParser(prog="llm-neo merge", description=COMMANDS["merge"])
    parser.add_argument("run_dir", help="Run directory written by `llm-neo distill` (holds config.yaml and adapter/).")
    parser.add_argument("--output", required=True, help="Directory for the merged model (safetensors + tokenizer).")
    args = parser.parse_args(argv)
    print(f"merged model written to {merge_run(args.run_dir, args.output)}")
    return 0


def cmd_export_lora(argv: list[str]) -> int:
    from .adapters.store import export_plain_lora
    from .artifacts import run_adapter_dir

    parser = argparse.ArgumentParser(prog="llm-neo export-lora", description=COMMANDS["export-lora"])
    parser.add_argument("run_dir", help="Run directory written by `llm-neo distill`, or an adapter directory.")
    parser.add_argument("--output", required=True, help="Directory for the plain LoRA adapter (safetensors).")
    args = parser.parse_args(argv)
    print(f"plain LoRA adapter written to {export_plain_lora(run_adapter_dir(args.run_dir), args.output)}")
    return 0


def cmd_demo(argv: list[str]) -> int:
    from .demo.run import run_demo

    parser = argparse.ArgumentParser(prog="llm-neo demo", description=COMMANDS["demo"])
    parser.add_argument("--output_dir", default="runs/demo", help="Where the demo writes its models and the neo run.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the data split, the models and training.")
    parser.add_argument("--adapter", default="lora", help="Adapter kind of the neo run (lora, moslora, dora, ...).")
    args = parser.parse_args(argv)
    run_demo(args.output_dir, seed=args.seed, adapter=args.adapter)
    return 0


HANDLERS = {"distill": cmd_distill, "cache-teacher": cmd_cache_teacher, "merge": cmd_merge,
            "export-lora": cmd_export_lora, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS:
        print(f"llm-neo: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return HANDLERS[command](rest)
    except NeoError as error:
        print(f"llm-neo {command}: error: {error}", file=sys.stderr)
        return 1
