"""A run directory's lifecycle: held by one process (its lock), claimed from an earlier run or refused, prepared
(resolved config, run.json, metrics.jsonl cut back to a resumed checkpoint), marked failed when the run stops on
an error, and the files every checkpoint carries."""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .adapters.store import KIND_FILE, kind_record
from .artifacts import save_resolved_config
from .methods import METHODS
from .runtime.checkpoints import checkpoint_step
from .runtime.identity import check_resume, identity_bytes
from .data.loading import HeldOutRows
from .runtime.atomic import write_atomically
from .runtime.layout import HELD_OUT_FILE, IDENTITY_FILE, METRICS_FILE
from .runtime.lock import DirectoryLock
from .runtime.resume import cut_metrics, resolve_checkpoint
from .runtime.run_dir import claim_output_dir, mark_failed, mark_started


def lock_run_dir(config):
    """The main process holds the run directory for the whole run; a second run into it fails at once."""
    main = config.training.process_index == 0
    return DirectoryLock(config.training.output_dir, "llm-neo distill") if main else nullcontext()


def claim_run_dir(config) -> None:
    """Refuse an output_dir holding another run (unless --overwrite_output_dir, which clears it first)."""
    if config.training.process_index == 0:
        claim_output_dir(config.training.output_dir, config.training.overwrite_output_dir,
                         resuming=bool(config.training.resume_from_checkpoint))


def prepare_run_dir(config, identity: dict, held_out: HeldOutRows | None = None) -> str | None:
    """Check a checkpoint to resume against this run's identity; write the resolved config, run.json and which rows
    were held out (``eval`` of the run reads just those); start metrics.jsonl afresh, or cut it back to the
    checkpoint resumed from (its path is returned)."""
    run_dir = Path(config.training.output_dir)
    resume = resolve_checkpoint(run_dir, config.training.resume_from_checkpoint)
    if resume is not None:
        check_resume(resume, identity)
    if config.training.process_index == 0:
        save_resolved_config(run_dir, config)
        if held_out is not None:
            write_atomically(run_dir / HELD_OUT_FILE, json.dumps(dataclasses.asdict(held_out)).encode())
        mark_started(run_dir, config.training.method, identity.get("models"))
        if resume is None:
            (run_dir / METRICS_FILE).unlink(missing_ok=True)
        else:
            cut_metrics(run_dir / METRICS_FILE, checkpoint_step(resume))
    return resume


@contextmanager
def failure_marked(config):
    """A started run that stops on an error is marked "failed" in run.json with the error (never left
    "running"); a kill cannot be marked, and is told from a live run by the run directory's lock."""
    try:
        yield
    except BaseException as error:
        if config.training.process_index == 0:
            mark_failed(config.training.output_dir, error)
        raise


def checkpoint_files(config, identity: dict, base: dict | None) -> dict[str, bytes]:
    """Written into every checkpoint: the run's identity (checked on resume) and, for adapter methods, the
    adapter kind and its ``base`` (so a checkpoint can be merged on its own)."""
    files = {IDENTITY_FILE: identity_bytes(identity)}
    if METHODS[config.training.method].uses_adapter:
        record = kind_record(config.adapter, base)
        files[KIND_FILE] = (json.dumps(record, indent=2) + "\n").encode("utf-8")
    return files


def saves_adapter(config) -> bool:
    return METHODS[config.training.method].uses_adapter and config.training.process_index == 0
