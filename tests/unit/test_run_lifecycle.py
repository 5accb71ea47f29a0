"""run_lifecycle.py: a started run that stops on an error is marked failed (with the error), a refused one leaves
the directory's earlier state alone; checkpoints carry the run identity."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from llmneo.run_lifecycle import checkpoint_files, failure_marked
from llmneo.runtime.layout import IDENTITY_FILE
from llmneo.runtime.run_dir import mark_started


def config_for(run_dir, method="sft"):
    return SimpleNamespace(training=SimpleNamespace(output_dir=str(run_dir), process_index=0, method=method))


def test_a_started_run_that_stops_is_marked_failed(tmp_path):
    mark_started(tmp_path, "neo")
    with pytest.raises(KeyboardInterrupt), failure_marked(config_for(tmp_path)):
        raise KeyboardInterrupt()
    state = json.loads((tmp_path / "run.json").read_text())
    assert state["status"] == "failed" and state["error"] == "KeyboardInterrupt" and state["method"] == "neo"


def test_a_finished_or_absent_run_state_is_left_alone(tmp_path):
    with pytest.raises(ValueError), failure_marked(config_for(tmp_path)):
        raise ValueError("refused")
    assert not (tmp_path / "run.json").exists()
    (tmp_path / "run.json").write_text(json.dumps({"status": "finished", "steps": 3}))
    with pytest.raises(ValueError), failure_marked(config_for(tmp_path)):
        raise ValueError("later")
    assert json.loads((tmp_path / "run.json").read_text()) == {"status": "finished", "steps": 3}


def test_checkpoints_carry_the_run_identity(tmp_path):
    files = checkpoint_files(config_for(tmp_path), {"options": {"alpha": 0.5}}, None)
    assert list(files) == [IDENTITY_FILE] and json.loads(files[IDENTITY_FILE])["options"] == {"alpha": 0.5}
