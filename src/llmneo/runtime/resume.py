"""`--resume_from_checkpoint latest|PATH`: the newest complete checkpoint, and metrics.jsonl cut back to it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import ConfigError
from .atomic import write_atomically
from .checkpoints import checkpoint_step, checkpoints, is_complete
from .layout import read_metrics

logger = logging.getLogger(__name__)

LATEST = ("latest", "true", "True")
SUMMARY_KEY = "train_runtime"  # the line the Trainer logs once, at the end of train()


def resolve_checkpoint(run_dir: Path, spec: str | None) -> str | None:
    """The checkpoint folder to resume from: ``latest`` is the newest complete one in the run directory."""
    if not spec:
        return None
    found = checkpoints(run_dir)
    complete = [(step, path) for step, path in found if is_complete(path)]
    if spec in LATEST:
        if not complete:
            raise ConfigError(f"no complete checkpoint in {run_dir} to resume from (save with --save_strategy steps)")
        skipped = [path.name for step, path in found if step > complete[-1][0] and not is_complete(path)]
        if skipped:
            logger.warning("skipping %s: interrupted while saving", ", ".join(skipped))
        return str(complete[-1][1])
    path = Path(spec)
    if not path.is_dir():
        raise ConfigError(f"checkpoint {path} does not exist")
    if not is_complete(path):
        newest = f"; the newest complete one is {complete[-1][1]}" if complete else ""
        raise ConfigError(f"checkpoint {path} is incomplete (its save was interrupted){newest}")
    return str(path)


def cut_metrics(path: Path, step: int) -> None:
    """Keep metrics.jsonl's entries up to ``step``, without the end-of-training summary: the resumed run logs the
    following steps, and its own summary, again."""
    if not Path(path).is_file():
        return
    kept = [entry for entry in read_metrics(path) if entry.get("step", 0) <= step and SUMMARY_KEY not in entry]
    write_atomically(Path(path), "".join(json.dumps(entry) + "\n" for entry in kept).encode("utf-8"))


__all__ = ["LATEST", "checkpoint_step", "cut_metrics", "resolve_checkpoint"]
