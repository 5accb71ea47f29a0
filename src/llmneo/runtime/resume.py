"""`--resume_from_checkpoint latest|PATH`: the newest complete checkpoint, and metrics.jsonl cut back to it."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from .atomic import write_atomically
from ..errors import ConfigError
from .checkpoints import is_complete

logger = logging.getLogger(__name__)

LATEST = ("latest", "true", "True")
_STEP = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(match.group(1)), path) for path in Path(run_dir).glob("checkpoint-*")
             if path.is_dir() and (match := _STEP.match(path.name))]
    return sorted(found)


def resolve_checkpoint(run_dir: Path, spec: str | None) -> str | None:
    """The checkpoint folder to resume from: ``latest`` is the newest complete one in the run directory."""
    if not spec:
        return None
    complete = [path for _, path in _checkpoints(run_dir) if is_complete(path)]
    if spec in LATEST:
        if not complete:
            raise ConfigError(f"no complete checkpoint in {run_dir} to resume from (save with --save_strategy steps)")
        skipped = [path.name for _, path in _checkpoints(run_dir) if path not in complete and path > complete[-1]]
        if skipped:
            logger.warning("skipping %s: interrupted while saving", ", ".join(skipped))
        return str(complete[-1])
    path = Path(spec)
    if not path.is_dir():
        raise ConfigError(f"checkpoint {path} does not exist")
    if not is_complete(path):
        newest = f"; the newest complete one is {complete[-1]}" if complete else ""
        raise ConfigError(f"checkpoint {path} is incomplete (its save was interrupted){newest}")
    return str(path)


def checkpoint_step(checkpoint: str) -> int:
    return int(_STEP.match(Path(checkpoint).name).group(1))


def cut_metrics(path: Path, step: int) -> None:
    """Keep metrics.jsonl's lines up to ``step``: the resumed run logs the following steps again."""
    if not Path(path).is_file():
        return
    kept = [line for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    write_atomically(Path(path), "".join(line + "\n" for line in kept).encode("utf-8"))
