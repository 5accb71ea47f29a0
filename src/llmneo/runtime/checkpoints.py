"""Checkpoint folders that are known to be complete: a marker file written last, and rotation only after it.

A kill while the Trainer saves leaves a folder without the marker, which resuming skips (resume.py); older
checkpoints are rotated only once the new one is marked, so a kill never costs the previous checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path

from transformers.trainer import rotate_checkpoints
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .atomic import write_atomically
from .layout import CHECKPOINT_COMPLETE



_STEP = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every checkpoint folder of a run directory with its step, oldest first (complete or not)."""
    found = [(int(match.group(1)), path) for path in Path(run_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if path.is_dir() and (match := _STEP.match(path.name))]
    return sorted(found)


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    return [(step, path) for step, path in checkpoints(run_dir) if is_complete(path)]


def checkpoint_step(checkpoint: str | Path) -> int:
    return int(_STEP.match(Path(checkpoint).name).group(1))


def checkpoint_folder(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


def is_complete(folder: Path) -> bool:
    return (Path(folder) / CHECKPOINT_COMPLETE).is_file()


def mark_complete_and_rotate(run_dir: str | Path, step: int, save_total_limit: int | None,
                             best_checkpoint: str | None, files: dict[str, bytes] | None = None) -> None:
    """Write ``files`` (name -> content) into checkpoint ``step``, mark it complete, then keep at most
    ``save_total_limit`` checkpoints (the Trainer's rule)."""
    for name, data in (files or {}).items():
        write_atomically(checkpoint_folder(run_dir, step) / name, data)
    write_atomically(checkpoint_folder(run_dir, step) / CHECKPOINT_COMPLETE, f"{step}\n".encode())
    rotate_checkpoints(output_dir=str(run_dir), save_total_limit=save_total_limit,
                       best_model_checkpoint=best_checkpoint, use_mtime=False)
