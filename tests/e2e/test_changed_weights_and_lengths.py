"""Reliability, round 3: weights rewritten in place under a run, length options that would lie, and prompts files
with blank lines."""

from __future__ import annotations

import shutil

import pytest

from conftest import run_flags
from llmneo import cli
from llmneo.config import parse_config
from llmneo.demo.tiny import build_tiny_llama
from llmneo.errors import ConfigError
from llmneo.pipeline import distill


@pytest.fixture
def own_models(models_dir, tmp_path, tokenizer):
    """Copies of the tiny student and teacher that a test may rewrite in place."""
    copies = dict(models_dir)
    for role in ("student", "teacher"):
        copies[role] = str(shutil.copytree(models_dir[role], tmp_path / role))
    return copies


def checkpointed_run(models, train_file, out):
    flags = run_flags(models, train_file, out, max_steps=2, save_strategy="steps", save_steps=2)
    distill(parse_config(flags))
    return run_flags(models, train_file, out, max_steps=4, save_strategy="steps", save_steps=2,
                     resume_from_checkpoint="latest")


@pytest.mark.e2e
@pytest.mark.parametrize(("role", "hidden"), [("teacher", 48), ("student", 32)])
def test_weights_rewritten_in_place_refuse_the_resume(own_models, train_file, tmp_path, tokenizer, role, hidden):
    resume = checkpointed_run(own_models, train_file, tmp_path / "run")
    build_tiny_llama(tokenizer, hidden_size=hidden, seed=99).save_pretrained(own_models[role])  # same shapes
    with pytest.raises(ConfigError, match=rf"cannot resume .*the {role} {own_models[role]}: its weights changed since "
                                          r"the checkpoint"):
        distill(parse_config(resume))
    assert not (tmp_path / "run" / "checkpoint-4").exists()


@pytest.mark.e2e
def test_unchanged_weights_resume(own_models, train_file, tmp_path):
    resume = checkpointed_run(own_models, train_file, tmp_path / "run")
    assert distill(parse_config(resume)).steps == 4


@pytest.mark.parametrize(("steps", "message"), [(0, r"max_steps 0 trains nothing"),
                                                (-5, r"max_steps -5: give a number of steps > 0, or -1")])
def test_max_steps_that_would_lie_are_refused(models_dir, train_file, tmp_path, steps, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(run_flags(models_dir, train_file, tmp_path, max_steps=steps))
    assert parse_config(run_flags(models_dir, train_file, tmp_path, max_steps=-1)).training.max_steps == -1


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    """A tiny model of 256 positions with its tokenizer."""
    path = tmp_path / "model"
    model = build_tiny_llama(tokenizer, hidden_size=32)
    model.config.max_position_embeddings = 256
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("tokens", ["0", "-3"])
def test_generate_refuses_a_non_positive_max_new_tokens(model_dir, capsys, tokens):
    assert cli.main(["generate", model_dir, "--prompt", "hi", "--max_new_tokens", tokens]) == 1
    assert f"--max_new_tokens {tokens}: give a number of tokens >= 1" in capsys.readouterr().err


def test_generate_refuses_more_tokens_than_the_model_has_positions(model_dir, capsys):
    assert cli.main(["generate", model_dir, "--prompt", "hi", "--max_new_tokens", "100000"]) == 1
    err = capsys.readouterr().err
    assert "--max_new_tokens 100000" in err and "the model reads at most 256 positions" in err


def test_blank_prompt_lines_are_skipped_and_counted(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n\n   \r\nhow are you\n", encoding="utf-8")
    assert cli.main(["generate", model_dir, "--prompts", str(prompts), "--max_new_tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("### prompt") == 2 and "### prompt\n\n" not in captured.out
    assert "skipped 2 blank lines" in captured.err


def test_a_blank_prompt_is_refused(model_dir, capsys):
    assert cli.main(["generate", model_dir, "--prompt", "  "]) == 1
    assert "--prompt is blank" in capsys.readouterr().err


@pytest.mark.e2e
def test_eval_of_a_run_whose_teacher_was_rewritten_is_refused_unless_named(own_models, train_file, tmp_path, tokenizer,
                                                                          capsys):
    """Row 11: `eval RUN --on_policy` after the teacher's weights were rewritten in place: refused before scoring
    (eval.json keeps the earlier figures); with --teacher_model the user says so and eval.json records which."""
    import json

    out = tmp_path / "run"
    assert cli.main(["distill", *run_flags(own_models, train_file, out, max_steps=1, eval_ratio=0.2)]) == 0
    evaluate = ["eval", str(out), "--on_policy", "--on_policy_max_new_tokens", "4", "--bootstrap", "0"]
    assert cli.main(evaluate) == 0
    first = json.loads((out / "eval.json").read_text())
    assert first["teacher"] == {"path": str(own_models["teacher"]), "sha256": first["teacher"]["sha256"],
                                "chosen_by": "the run", "same_as_the_runs_teacher": True}
    build_tiny_llama(tokenizer, hidden_size=48, seed=99).save_pretrained(own_models["teacher"])  # same shapes
    capsys.readouterr()
    assert cli.main(evaluate) == 1
    err = capsys.readouterr().err
    assert f"the run's teacher {own_models['teacher']}: its weights changed since the run trained with it" in err
    assert f"--teacher_model {own_models['teacher']}" in err
    assert json.loads((out / "eval.json").read_text()) == first  # not overwritten
    assert cli.main([*evaluate, "--teacher_model", own_models["teacher"]]) == 0
    chosen = json.loads((out / "eval.json").read_text())
    assert chosen["teacher"]["chosen_by"] == "--teacher_model" and chosen["teacher"]["same_as_the_runs_teacher"] is False
    assert chosen["teacher"]["sha256"] != first["teacher"]["sha256"]
    assert chosen["on_policy"]["on_policy_reverse_kl"] != first["on_policy"]["on_policy_reverse_kl"]
