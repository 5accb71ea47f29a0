"""On-policy distillation through `llm-neo distill`: the schedule in the log, the rollout figures, and a run
SIGKILLed after a checkpoint and resumed equals the uninterrupted run (sampled rollouts)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from safetensors.torch import load_file

from conftest import checkout_env, run_flags
from killer import KILLER
from llmneo import cli

pytestmark = pytest.mark.e2e
ON_POLICY = {"on_policy_fraction": 0.5, "rollout_max_new_tokens": 8, "rollout_temperature": 1.0}


STEPS = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2, "logging_steps": 1}


def flags(models_dir, train_file, out, **extra):
    return ["distill", *run_flags(models_dir, train_file, out, **{**STEPS, **extra})]


def adapter(run_dir) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def logged(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "kd_loss" in json.loads(line)]


@pytest.mark.parametrize("loss,across", [("full", False), ("sampled", False), ("sampled", True)])
def test_on_policy_steps_alternate_and_resume_exactly(models_dir, train_file, tmp_path, char_teacher, loss, across):
    """``across``: a character-level teacher (--cross_tokenizer exact) scores the BPE student's answers."""
    options = {**ON_POLICY, "on_policy_loss": loss}
    if across:
        options.update(cross_tokenizer="exact", teacher=char_teacher)
    straight = tmp_path / "straight"
    assert cli.main(flags(models_dir, train_file, straight, **options)) == 0
    lines = logged(straight)
    assert [line["on_policy"] for line in lines] == [0, 1, 0, 1, 0, 1]
    for line in lines:
        if line["on_policy"]:  # the KD term alone, on the student's own answers
            assert line["ce_loss"] == 0 and line["loss"] == pytest.approx(line["kd_loss"], rel=1e-6)
            assert line["rollout_tokens"] >= 4 and line["rollout_s"] > 0 and 0 <= line["rollout_cut"] <= 1
            # the engine's log p of each sampled token, beside its label, against the step's own forward
            assert line["rollout_logprob_gap"] <= 1e-4 and line["rollout_tokens_per_s"] > 0
        else:
            assert line["ce_loss"] > 0 and line["rollout_tokens"] == 0 and "rollout_logprob_gap" not in line

    killed = tmp_path / "killed"
    result = subprocess.run([sys.executable, "-c", KILLER, "step", "3", *flags(models_dir, train_file, killed,
                                                                               **options)],
                            capture_output=True, text=True, env=checkout_env(OMP_NUM_THREADS="1"))
    assert result.returncode == -9, result.stderr[-2000:]
    assert cli.main([*flags(models_dir, train_file, killed, **options), "--resume_from_checkpoint", "latest"]) == 0
    for name, weight in adapter(straight).items():
        torch.testing.assert_close(adapter(killed)[name], weight, rtol=0, atol=1e-6)
    assert [line["loss"] for line in logged(killed)] == pytest.approx([line["loss"] for line in lines], rel=1e-6)


def test_accumulation_splits_train_the_same_adapter(models_dir, train_file, tmp_path):
    """4 rows per step as 4x1, 2x2 and 1x4 micro-batches: on-policy steps (sampled rollouts) train one adapter."""
    options = {**ON_POLICY, "on_policy_fraction": 1, "max_steps": 2, "save_strategy": "no"}
    runs = {}
    for micro, accumulation in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"{micro}x{accumulation}"
        assert cli.main(["distill", *run_flags(models_dir, train_file, out, **{
            **options, "per_device_train_batch_size": micro, "gradient_accumulation_steps": accumulation})]) == 0
        runs[micro] = adapter(out)
    for micro in (2, 1):
        for name, weight in runs[4].items():
            torch.testing.assert_close(runs[micro][name], weight, rtol=1e-5, atol=1e-6)


def test_eval_on_policy_of_a_run(models_dir, train_file, tmp_path):
    out = tmp_path / "run"
    assert cli.main(flags(models_dir, train_file, out, **ON_POLICY, eval_ratio=0.2)) == 0
    assert cli.main(["eval", str(out), "--on_policy", "--on_policy_max_new_tokens", "8", "--bootstrap", "50"]) == 0
    report = json.loads((out / "eval.json").read_text())["on_policy"]
    assert report["on_policy_prompts"] >= 5 and report["on_policy_reverse_kl_ci_low"] <= report["on_policy_reverse_kl"]


def test_plain_text_rows_are_refused_before_training(models_dir, tmp_path, capsys):
    """Row 7: on-policy steps need a prompt to answer; plain text rows have none."""
    from conftest import write_jsonl
    from llmneo.demo.tiny import corpus_texts

    data = write_jsonl(tmp_path / "text.jsonl", [{"text": text} for text in corpus_texts()[:16]])
    out = tmp_path / "run"
    assert cli.main(flags(models_dir, data, out, **ON_POLICY)) == 1
    err = capsys.readouterr().err
    assert "plain 'text' rows, with no prompt for the student to answer; on-policy steps need rows with a prompt" in err
    assert "Traceback" not in err and not (out / "adapter").exists()


@pytest.mark.parametrize("temperature", ["1e-45", "0.0005", "-1"])
def test_a_temperature_too_small_to_sample_with_is_refused(models_dir, train_file, tmp_path, capsys, temperature):
    """Row 8: below 0.001 logits / T overflow; 0 (greedy) stays allowed."""
    out = tmp_path / "run"
    assert cli.main(flags(models_dir, train_file, out, **{**ON_POLICY, "rollout_temperature": temperature})) == 1
    assert "rollout_temperature must be 0 (greedy) or >= 0.001" in capsys.readouterr().err
    assert not out.exists()


def test_a_crash_marks_the_run_failed_not_running(models_dir, train_file, tmp_path):
    """A run that stops on an error never stays "running" in run.json: it says failed, and why."""
    from transformers import TrainerCallback

    from llmneo.config import parse_config
    from llmneo.pipeline import distill

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("a fault in step 2")

    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="a fault in step 2"):
        distill(parse_config(run_flags(models_dir, train_file, out, **ON_POLICY)), callbacks=[Boom()])
    state = json.loads((out / "run.json").read_text())
    assert state["status"] == "failed" and state["error"] == "RuntimeError: a fault in step 2" and state["stopped"]
