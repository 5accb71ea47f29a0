"""One cell of an experiment: train a configuration into its own directory, evaluate it, and record the result.

A cell is finished when its ``result.json`` exists (written atomically, last): re-running an experiment skips
finished cells and trains again any cell that was interrupted.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

from ..runtime.atomic import write_atomically
from ..config import parse_config
from ..runtime.memory import PeakMemory
from ..pipeline import distill
from ..evaluation.evaluate import EvalRequest, evaluate_target, flatten
from ..runtime.layout import RESULT_FILE

logger = logging.getLogger(__name__)



def run_cell(argv: list[str], cell_dir: Path, label: dict, eval_options: dict | None = None) -> dict:
    """Train ``argv`` (llm-neo distill options) into ``cell_dir`` and evaluate it; a finished cell is read back."""
    cell_dir = Path(cell_dir)
    result_path = cell_dir / RESULT_FILE
    if result_path.is_file():
        logger.info("cell %s finished before: skipped", cell_dir)
        return json.loads(result_path.read_text(encoding="utf-8"))
    # The experiment owns its cells: an unfinished cell is trained again from the start.
    config = parse_config([*argv, "--output_dir", str(cell_dir), "--overwrite_output_dir", "true"])
    logger.info("cell %s: training %s", cell_dir, label)
    with PeakMemory() as memory:
        started = time.perf_counter()
        summary = distill(config)
        wall = time.perf_counter() - started
    metrics = flatten(evaluate_target(EvalRequest(target=str(cell_dir), teacher_model=config.model.teacher_model,
                                                  **(eval_options or {}))))
    result = {**label, "trainable_parameters": summary.trainable_parameters,
              "peak_memory_gib": round(memory.peak_bytes / 2**30, 3), "wall_time_s": round(wall, 2),
              "steps": summary.steps, "trained_answer_tokens": summary.trained_answer_tokens,
              **{key: round(value, 6) for key, value in metrics.items()}}
    write_atomically(result_path, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    gc.collect()
    return result
