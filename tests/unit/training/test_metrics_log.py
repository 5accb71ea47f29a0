"""training/metrics_log.py: each log event is one JSON line with its step, from the main process only."""

from __future__ import annotations

from types import SimpleNamespace

from llmneo.runtime.layout import read_metrics
from llmneo.training.metrics_log import MetricsJsonlCallback


def test_each_log_event_is_one_line_with_its_step(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    callback = MetricsJsonlCallback(str(path))
    main, other = SimpleNamespace(is_world_process_zero=True, global_step=3), SimpleNamespace(
        is_world_process_zero=False, global_step=3)
    callback.on_log(None, main, None, logs={"loss": 1.5})
    callback.on_log(None, other, None, logs={"loss": 9.0})
    callback.on_log(None, main, None, logs={})
    callback.on_log(None, SimpleNamespace(is_world_process_zero=True, global_step=4), None, logs={"loss": 1.0})
    assert read_metrics(path) == [{"step": 3, "loss": 1.5}, {"step": 4, "loss": 1.0}]
