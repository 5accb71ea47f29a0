"""runtime/layout.py: one function tells a run, one of its checkpoints and a model directory apart."""

from __future__ import annotations

import pytest

from llmneo.errors import ConfigError
from llmneo.runtime.layout import CONFIG_FILE, open_target


def test_runs_checkpoints_and_models_are_told_apart(tmp_path):
    run, model = tmp_path / "run", tmp_path / "model"
    (run / "checkpoint-3").mkdir(parents=True)
    (run / CONFIG_FILE).write_text("{}")
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert open_target(run).kind == "run" and open_target(run).run_dir == run
    opened = open_target(run / "checkpoint-3")
    assert (opened.kind, opened.run_dir) == ("checkpoint", run)
    assert open_target(model).kind == "model" and open_target(model).run_dir is None
    with pytest.raises(ConfigError, match=r"is not a run directory: config.yaml is missing"):
        open_target(model, models=False)


def test_anything_else_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"is neither a run directory \(config.yaml\) nor a model directory"):
        open_target(tmp_path)
    assert open_target("org/model-on-the-hub", hub_ids=True).kind == "model"
    with pytest.raises(ConfigError, match="neither"):
        open_target(tmp_path / "missing")
