"""training/failures.py: the resume command is the command line the run started with, resuming; a fault before
any step saves nothing and says so."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from llmneo.training.failures import _save_last_good_step, resume_command


def test_the_resume_command_repeats_the_command_line_without_an_earlier_resume(monkeypatch):
    config = SimpleNamespace(training=SimpleNamespace(output_dir="runs/x"))
    monkeypatch.setattr(sys, "argv", ["/venv/bin/llm-neo", "distill", "--config", "a b.yaml",
                                      "--resume_from_checkpoint", "checkpoint-2", "--seed", "3"])
    assert resume_command(config) == ("Resume with: llm-neo distill --config 'a b.yaml' --seed 3 "
                                      "--resume_from_checkpoint latest")
    monkeypatch.setattr(sys, "argv", ["python", "train.py"])
    assert resume_command(config) == ("Resume with the same options and --resume_from_checkpoint latest "
                                      "(run runs/x).")


def test_nothing_is_saved_before_the_first_step():
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=0))
    assert _save_last_good_step(trainer) == "No step had finished, so nothing was saved."
