"""Checkpoint folders that are known to be complete: a marker file written last, and rotation only after it.

A kill while the Trainer saves leaves a folder without the marker, which resuming skips (resume.py); older
checkpoints are rotated only once the new one is marked, so a kill never costs the previous checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from transformers.trainer import rotate_checkpoints
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .atomic import write_atomically

CHECKPOINT_COMPLETE = "llmneo_checkpoint_complete"  # written last into every checkpoint folder


def checkpoint_folder(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


def is_complete(folder: Path) -> bool:
    return (Path(folder) / CHECKPOINT_COMPLETE).is_file()


def mark_complete_and_rotate(run_dir: str | Path, step: int, save_total_limit: int | None,
                             best_checkpoint: str | None) -> None:
    """Mark checkpoint ``step`` complete, then keep at most ``save_total_limit`` checkpoints (the Trainer's rule)."""
    write_atomically(checkpoint_folder(run_dir, step) / CHECKPOINT_COMPLETE, f"{step}\n".encode())
    rotate_checkpoints(output_dir=str(run_dir), save_total_limit=save_total_limit,
                       best_model_checkpoint=best_checkpoint, use_mtime=False)
