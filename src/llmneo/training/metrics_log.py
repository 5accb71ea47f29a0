"""metrics.jsonl: every log event of a run, one JSON object per line."""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback


class MetricsJsonlCallback(TrainerCallback):
    """Appends every log event (step, loss, ce_loss, kd_loss, learning_rate, ...) to ``metrics.jsonl``."""

    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")
