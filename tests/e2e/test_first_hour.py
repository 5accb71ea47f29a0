"""A user's first hour: a run made with relative paths is evaluated, merged and asked from another folder; merge
says where it wrote once; generate stops where an answer ends."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_flags
from llmneo import cli

pytestmark = pytest.mark.e2e


def test_a_run_with_relative_paths_is_used_from_another_folder(models_dir, train_file, tmp_path, monkeypatch, capsys):
    here, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (here / "models").mkdir(parents=True)
    elsewhere.mkdir()
    for name in ("student", "teacher"):
        shutil.copytree(models_dir[name], here / "models" / name)
    shutil.copy(train_file, here / "train.jsonl")
    monkeypatch.chdir(here)
    flags = run_flags({"student": "models/student", "teacher": "models/teacher"}, "train.jsonl", "run",
                      eval_ratio=0.25)
    assert cli.main(["distill", *flags]) == 0
    recorded = (here / "run" / "config.yaml").read_text(encoding="utf-8")
    assert f"student_model: {here / 'models' / 'student'}" in recorded
    assert f"dataset: {here / 'train.jsonl'}" in recorded
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli.main(["eval", str(here / "run"), "--bootstrap", "0"]) == 0
    out, err = capsys.readouterr()
    assert "perplexity" in json.loads(out)["held_out"]
    assert err.strip().endswith(f"results written to {here / 'run' / 'eval.json'}")  # every command ends with where
    assert cli.main(["merge", str(here / "run"), "--output", "merged"]) == 0
    out, err = capsys.readouterr()
    assert (out + err).count("merged model written to") == 1, "merge says where it wrote once"
    assert "Writing model shards" not in err and "Loading weights" not in err  # sub-second bars stay out of logs
    assert (elsewhere / "merged" / "config.json").is_file()
    assert cli.main(["generate", str(here / "run"), "--prompt", "What is the sky?", "--max_new_tokens", "4"]) == 0


def test_a_missing_recorded_model_is_named_not_fetched(models_dir, train_file, tmp_path, monkeypatch, capsys):
    here = tmp_path / "project"
    (here / "models").mkdir(parents=True)
    shutil.copytree(models_dir["student"], here / "models" / "student")
    monkeypatch.chdir(here)
    assert cli.main(["distill", *run_flags({"student": "models/student"}, train_file, "run", method="lora")]) == 0
    shutil.rmtree(here / "models")
    capsys.readouterr()
    assert cli.main(["merge", "run", "--output", "merged"]) == 1
    assert capsys.readouterr().err.strip().endswith(f"student model path {here / 'models' / 'student'} does not exist")


def test_eval_tasks_offline_says_which_task_and_keeps_the_held_out_metrics(models_dir, train_file, tmp_path,
                                                                           monkeypatch, capsys):
    import lm_eval  # noqa: F401  - the eval extra, installed by the README's install command
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    run = tmp_path / "run"
    assert cli.main(["distill", *run_flags(models_dir, train_file, run, method="lora", eval_ratio=0.25)]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--bootstrap", "0", "--tasks", "arc_easy", "--limit", "2"]) == 1
    out, err = capsys.readouterr()
    assert err.splitlines()[-1].startswith("llm-neo eval: error: lm-eval task 'arc_easy' could not be fetched")
    assert err.count("could not be fetched") == 1 and "Traceback" not in err
    assert "perplexity" in json.loads(out)["held_out"]
    assert "perplexity" in json.loads((run / "eval.json").read_text(encoding="utf-8"))["held_out"]


def test_eval_of_a_run_tokenizes_only_its_held_out_rows(models_dir, train_file, tmp_path, monkeypatch, capsys):
    """The run records which rows its --eval_ratio split held out; eval reads those alone (the same rows, so the
    same figures as splitting everything again), and refuses data that changed since."""
    import llmneo.data.loading as loading
    from llmneo.evaluation.evaluate import EvalRequest, evaluate_target

    run, data = tmp_path / "run", tmp_path / "train.jsonl"
    shutil.copy(train_file, data)
    assert cli.main(["distill", *run_flags(models_dir, str(data), run, method="lora", eval_ratio=0.25)]) == 0
    rows = len(data.read_text(encoding="utf-8").splitlines())
    held_out = len(json.loads((run / "held_out_rows.json").read_text(encoding="utf-8"))["positions"])
    assert held_out == rows - int(rows * 0.75)  # datasets' split: ceil(25%)
    encoded = []
    original = loading.encode_messages
    monkeypatch.setattr(loading, "encode_messages", lambda *args: encoded.append(1) or original(*args))
    request = EvalRequest(target=str(run), bootstrap=0)
    recorded = evaluate_target(request, write=False)["held_out"]
    assert len(encoded) == held_out
    (run / "held_out_rows.json").unlink()  # as a run from before the record: every row split again
    again = evaluate_target(request, write=False)["held_out"]
    assert len(encoded) == held_out + rows
    assert recorded == again
    assert cli.main(["distill", *run_flags(models_dir, str(data), tmp_path / "run2", method="lora",
                                           eval_ratio=0.25)]) == 0
    lines = data.read_text(encoding="utf-8").splitlines()
    data.write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run2"), "--bootstrap", "0"]) == 1
    assert capsys.readouterr().err.strip().endswith(f"file {data}: changed since the run held out its rows (their "
                                                    "content differs): evaluate on a held-out file with --dataset")
