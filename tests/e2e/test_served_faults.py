"""Faults of a served teacher seen through the commands, against the in-process stand-in server: an answer that
is not a distribution stops `distill` before it trains on it (no resume command when nothing was saved, the run
marked failed), and a `cache-teacher` refused at its start leaves no directory behind."""

from __future__ import annotations

import json
import re

import pytest
from transformers import TrainerCallback

from conftest import run_flags
from llmneo import cli
from llmneo.config import parse_config
from llmneo.errors import TeacherServerError
from llmneo.pipeline import distill
from llmneo.runtime.checkpoints import complete_checkpoints
from standin_server import StandInServer

pytestmark = pytest.mark.e2e


@pytest.fixture()
def standin(tokenizer):
    server = StandInServer(tokenizer)
    yield server
    server.close()


def served(models_dir, train_file, out, url: str, **extra) -> list[str]:
    flags = run_flags(models_dir, train_file, out, **extra)
    at = flags.index("--teacher_model")
    del flags[at:at + 2]
    return [*flags, "--teacher_server", url, "--teacher_top_k", "4", "--teacher_server_retries", "0"]


def error_line(captured) -> str:
    lines = [line for line in captured.err.splitlines() if line.startswith("llm-neo ")]
    assert len(lines) == 1, captured.err[-3000:]
    return lines[0]


def shifted_up(positions):
    """Every value raised by 3: a server that forgot its normalisation."""
    return [positions[0], *[{t: {**v, "logprob": v["logprob"] + 3.0} for t, v in p.items()} for p in positions[1:]]]


def after(good: int, fault):
    """``fault`` from the answer after the first ``good`` ones on."""
    calls = []

    def corrupt(positions):
        calls.append(1)
        return positions if len(calls) <= good else fault(positions)
    return corrupt


def test_a_broken_probe_is_refused_before_the_run_starts(models_dir, train_file, standin, tmp_path, capsys):
    out = tmp_path / "run"
    standin.corrupt = shifted_up
    assert cli.main(["distill", *served(models_dir, train_file, out, standin.url)]) == 1
    line = error_line(capsys.readouterr())
    assert "returned log-probability" in line and "> 0 for token" in line and "at probe position 0" in line, line
    assert not (out / "run.json").exists()


def test_log_probabilities_above_zero_stop_the_run_before_step_1(models_dir, train_file, standin, tmp_path, capsys):
    """Row 1 and row 12: the probe answers well (the fingerprint and the k check), the training rows are shifted
    up: refused naming the training row, the position and the value; no step trained, nothing to resume, and
    run.json says failed and why."""
    out = tmp_path / "run"
    standin.corrupt = after(2, shifted_up)
    assert cli.main(["distill", *served(models_dir, train_file, out, standin.url)]) == 1
    line = error_line(capsys.readouterr())
    assert re.search(r"log-probability \d+\.\d+ > 0 for token \d+ at training row \d+ at position \d+", line), line
    assert "No step had finished, so nothing was saved" in line and "there is nothing to resume" in line, line
    assert "Resume with" not in line and "--resume_from_checkpoint" not in line, line
    state = json.loads((out / "run.json").read_text())
    assert state["status"] == "failed" and "not a log-probability" in state["error"], state
    assert not (out / "adapter").exists() and not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize("event, resumable", [("on_step_end", False), ("on_save", True)])
def test_the_resume_command_only_when_a_checkpoint_is_complete(models_dir, train_file, standin, tmp_path, event,
                                                                resumable):
    """Row 12's other sides: broken after step 1 but before its checkpoint completed (the checkpoint's probe
    check fails too): nothing to resume, no resume command; broken once checkpoint-1 is complete: the message
    says how to resume."""
    out = tmp_path / "run"

    def break_the_server(self, args, state, control, **kwargs):
        if state.global_step == 1:
            standin.corrupt = lambda positions: [positions[0], *[{t: {**v, "rank": 1} for t, v in p.items()}
                                                                 for p in positions[1:]]]

    config = parse_config(served(models_dir, train_file, out, standin.url, save_strategy="steps", save_steps=1))
    with pytest.raises(TeacherServerError) as raised:
        distill(config, callbacks=[type("BreakTheServer", (TrainerCallback,), {event: break_the_server})()])
    message = str(raised.value)
    assert "must have ranks 1..4, each once" in message, message
    assert bool(complete_checkpoints(out)) == resumable
    if resumable:
        assert re.search(r"Resume with .*--resume_from_checkpoint latest", message), message
    else:
        assert "there is nothing to resume" in message and "Resume with" not in message, message
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_cache_teacher_refused_at_its_start_leaves_nothing(models_dir, train_file, standin, tmp_path, capsys):
    """Row 13: --top_k above the server's --max-logprobs is refused, and CACHE_DIR is not left holding a lock file."""
    cache_dir = tmp_path / "cache"
    flags = served(models_dir, train_file, tmp_path / "unused", standin.url)
    assert cli.main(["cache-teacher", "--cache_dir", str(cache_dir), "--top_k", "100", *flags]) == 1
    assert "--top_k 100 is more than teacher server" in error_line(capsys.readouterr())
    assert not cache_dir.exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    assert cli.main(["cache-teacher", "--cache_dir", str(existing), "--top_k", "100", *flags]) == 1
    assert existing.is_dir() and not any(existing.iterdir())  # the user's own folder stays, empty as it was


def test_on_policy_steps_ask_nothing_for_the_rows_they_replace(models_dir, train_file, standin, tokenizer, tmp_path):
    """--on_policy_fraction 0.5 over 4 steps of 4 rows: the server is asked for the 8 rows of the two off-policy
    steps and the 8 answers of the two on-policy steps, not for the rows the answers replace nor for the batch the
    data loader collates ahead after the last step."""
    from llmneo.teacher.server import probe_text

    out = tmp_path / "run"
    flags = served(models_dir, train_file, out, standin.url, max_steps=4, on_policy_fraction=0.5,
                   rollout_max_new_tokens=4, rollout_temperature=0)
    assert cli.main(["distill", *flags]) == 0
    probe = tokenizer(probe_text(tokenizer), add_special_tokens=False)["input_ids"]
    asked = [body["prompt"] for path, body in standin.requests if path == "/v1/completions" and body["prompt"] != probe]
    assert len(asked) == 16, len(asked)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["on_policy"] for row in logged if "on_policy" in row] == [0.0, 1.0, 0.0, 1.0]
