"""Why a run stopped, said in one line with what to do next: a non-finite step, a teacher or rollout server that stopped
answering, running out of memory or disk. The last good step is saved first where one finished; the resume command
is given only when a complete checkpoint exists."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch

from ..errors import NonFiniteError, ServerError, TrainingOutOfMemory
from ..runtime.checkpoints import complete_checkpoints


def train_or_explain(trainer, config, resume):
    """Train; on a non-finite step or out of memory, save what can be saved and stop with what to change."""
    try:
        return trainer.train(resume_from_checkpoint=resume)
    except NonFiniteError as error:
        saved = _save_last_good_step(trainer)
        raise NonFiniteError(f"{error}. {saved}") from None
    except ServerError as error:
        saved = _save_last_good_step(trainer, resume_hint=False)
        then = (resume_command(config) if complete_checkpoints(config.training.output_dir) else
                "Run the same command again once the server answers (there is nothing to resume).")
        raise type(error)(f"{error}. {saved} {then}") from None
    except torch.OutOfMemoryError:
        saved = _save_last_good_step(trainer)
        args = config.training
        tokens = args.per_device_train_batch_size * config.data.max_length
        raise TrainingOutOfMemory(
            f"out of memory at step {trainer.state.global_step + 1} with up to {tokens} tokens per micro-batch "
            f"({args.per_device_train_batch_size} rows x max_length {config.data.max_length}). {saved} Try a smaller "
            f"--per_device_train_batch_size (with more --gradient_accumulation_steps), --auto_micro_batch, a smaller "
            f"--kd_chunk_size (now {config.training.kd_chunk_size}), --activation_checkpointing true, "
            "--packing, or take the teacher out of memory with --teacher_cache or --teacher_quantization nf4"
        ) from None


def _save_last_good_step(trainer, resume_hint: bool = True) -> str:
    if trainer.state.global_step == 0:
        return "No step had finished, so nothing was saved."
    try:
        trainer.save_checkpoint_now()
    except Exception as error:  # saving is best effort here: the original failure is what matters
        return f"Saving a checkpoint failed too ({type(error).__name__}: {error})."
    hint = " (resume with --resume_from_checkpoint latest)" if resume_hint else ""
    return f"The last good step was saved as checkpoint-{trainer.state.global_step}{hint}."


def resume_command(config) -> str:
    """How to continue the run: the command line it was started with (when started from the CLI), resuming."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if not skip and not arg.startswith("--resume_from_checkpoint"):
            args.append(arg)
        skip = arg == "--resume_from_checkpoint"  # its value follows it
    if Path(sys.argv[0]).name == "llm-neo" and args[:1] == ["distill"]:
        return "Resume with: llm-neo " + shlex.join([*args, "--resume_from_checkpoint", "latest"])
    return f"Resume with the same options and --resume_from_checkpoint latest (run {config.training.output_dir})."


def disk_full_message(error: OSError, run_dir) -> str:
    complete = complete_checkpoints(run_dir)
    resume = (f"the last complete checkpoint is {complete[-1][1].name}: free some space, then resume with "
              "--resume_from_checkpoint latest" if complete else "no checkpoint was complete yet")
    return f"disk full writing {error.filename or run_dir}; {resume}"
