"""runtime/run_dir.py: a run directory belongs to one run, and its state says which and how far it got."""

from __future__ import annotations

import pytest

from llmneo.errors import ConfigError
from llmneo.runtime.checkpoints import mark_complete_and_rotate
from llmneo.runtime.layout import LOCK_FILE, METRICS_FILE
from llmneo.runtime.run_dir import (claim_output_dir, describe_run, holds_run, mark_finished, mark_started,
                                    require_finished, require_new_output, run_status)


def checkpoint(run_dir, step, complete=True):
    (run_dir / f"checkpoint-{step}").mkdir(parents=True)
    if complete:
        mark_complete_and_rotate(run_dir, step, None, None, {})


def test_an_empty_directory_holds_no_run(tmp_path):
    assert not holds_run(tmp_path) and not holds_run(tmp_path / "missing")
    claim_output_dir(tmp_path, overwrite=False, resuming=False)  # nothing to refuse


def test_started_then_interrupted_then_finished(tmp_path):
    mark_started(tmp_path, "neo")
    assert holds_run(tmp_path) and run_status(tmp_path) == ("interrupted", 0)
    checkpoint(tmp_path, 4)
    checkpoint(tmp_path, 6, complete=False)  # a save that was killed does not count
    assert run_status(tmp_path) == ("interrupted", 4)
    assert describe_run(tmp_path).startswith("an interrupted neo run (newest complete checkpoint at step 4")
    with pytest.raises(ConfigError, match=r"did not finish \(interrupted at step 4\).*merge checkpoint-4 explicitly"):
        require_finished(tmp_path, "merge")
    mark_finished(tmp_path, 10)
    assert run_status(tmp_path) == ("finished", 10)
    require_finished(tmp_path, "merge")


def test_another_runs_directory_is_refused_or_cleared_but_its_lock_kept(tmp_path):
    mark_started(tmp_path, "lora")
    (tmp_path / METRICS_FILE).write_text("{}\n")
    (tmp_path / LOCK_FILE).write_text("holder")
    with pytest.raises(ConfigError, match=r"already holds an interrupted lora run"):
        claim_output_dir(tmp_path, overwrite=False, resuming=False)
    claim_output_dir(tmp_path, overwrite=False, resuming=True)  # resuming continues it
    claim_output_dir(tmp_path, overwrite=True, resuming=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == [LOCK_FILE]


def test_new_outputs_are_never_written_over(tmp_path):
    require_new_output(tmp_path / "new")
    require_new_output(tmp_path)  # empty
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"--output .*file is an existing file"):
        require_new_output(tmp_path / "file")
    with pytest.raises(ConfigError, match=r"already exists and is not empty"):
        require_new_output(tmp_path)
