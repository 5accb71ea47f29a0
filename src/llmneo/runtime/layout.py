"""The run layout: every file a run directory (and its checkpoints) holds, named once, the one metrics.jsonl reader,
and ``open_target``, which tells a run, one of its checkpoints and a model directory apart for eval, generate,
merge and export-lora."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

logger = logging.getLogger(__name__)

# ---- a run directory ---------------------------------------------------------------------------------------------
RUN_FILE = "run.json"  # method, start and status (running / finished)
CONFIG_FILE = "config.yaml"  # the resolved config; --config accepts it again
METRICS_FILE = "metrics.jsonl"  # one JSON object per log event
ADAPTER_DIR = "adapter"  # the PEFT adapter of lora/neo runs
INITIAL_ADAPTER_DIR = "adapter-init"  # the untrained adapter of a base-mutating init (PiSSA, OLoRA)
MODEL_DIR = "model"  # the full weights of sft/kd runs
CARD_FILE = "README.md"  # the model card
REPORT_FILE = "report.md"
CURVES_FILE = "training_curves.png"
BEFORE_FILE = "before.json"  # the student's held-out metrics and answers before the first step
EVAL_FILE = "eval.json"  # what `llm-neo eval` measured
HELD_OUT_FILE = "held_out_rows.json"  # --eval_ratio: which rows read were held out, and their digest
MAP_FILE = "vocabulary_map.safetensors"  # across tokenizers: the vocabulary map (also in a cache directory)
CACHE_MANIFEST = "manifest.json"  # a teacher cache directory's manifest (teacher/cache.py)
LOCK_FILE = ".llmneo.lock"  # held by the process that writes the directory (also a cache directory)
RESULT_FILE = "result.json"  # an experiment cell's result, written last
# ---- each checkpoint-K folder, besides the Trainer's own files ---------------------------------------------------
CHECKPOINT_PREFIX = "checkpoint-"
IDENTITY_FILE = "llmneo_run_identity.json"  # the run's options and data fingerprint, checked on resume
LOSS_SUM_FILE = "llmneo_train_loss.json"  # the step losses summed so far, for a resumed run's train_loss
CHECKPOINT_COMPLETE = "llmneo_checkpoint_complete"  # written last
# ---- what marks a directory as holding a run (written by this or an earlier llm-neo) -----------------------------
RUN_MARKERS = (RUN_FILE, CONFIG_FILE, METRICS_FILE, ADAPTER_DIR, MODEL_DIR)


@dataclass(frozen=True)
class Target:
    """A path a command reads: a run directory, a checkpoint of one, or a model directory."""

    kind: str  # "run", "checkpoint" or "model"
    path: Path
    run_dir: Path | None  # the run it belongs to (None for a model directory)


def open_target(path: str | Path, models: bool = True, hub_ids: bool = False) -> Target:
    """``path`` as a run (it holds config.yaml), one of a run's checkpoints (``RUN/checkpoint-K``) or, with
    ``models``, a model directory (config.json) or (with ``hub_ids``) a name that is no local path; anything else is
    an error saying what is missing."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return Target("run", path, path)
    if path.name.startswith(CHECKPOINT_PREFIX) and (path.parent / CONFIG_FILE).is_file():
        return Target("checkpoint", path, path.parent)
    if not models:
        raise ConfigError(f"{path} is not a run directory: {CONFIG_FILE} is missing")
    if (path / "config.json").is_file() or (hub_ids and not path.exists()):
        return Target("model", path, None)
    raise ConfigError(f"{path} is neither a run directory ({CONFIG_FILE}) nor a model directory (config.json)")


def read_metrics(path: str | Path) -> list[dict]:
    """metrics.jsonl's entries. A torn last line (the process died while appending it) is dropped with a warning;
    a torn line anywhere else means the file was damaged, which is an error."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    entries = []
    for number, line in enumerate(lines, start=1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                logger.warning("%s: dropping its torn last line %d (%s)", path, number, error)
                break
            raise ConfigError(f"{path} line {number} is not valid JSON ({error}): the file is damaged") from None
    return entries
