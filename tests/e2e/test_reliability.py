"""Resuming after SIGKILL (after a step, and in the middle of a checkpoint save) reproduces the uninterrupted run;
metrics.jsonl continues without duplicates or gaps; incomplete checkpoints are never resumed from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transformers import TrainerCallback

from conftest import checkout_env, run_flags
from killer import KILLER
from llmneo import cli
from llmneo.config import parse_config
from llmneo.errors import ConfigError, NonFiniteError, TrainingOutOfMemory
from llmneo.pipeline import distill
from llmneo.runtime.resume import resolve_checkpoint


STEPS = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2, "logging_steps": 1}


def flags(models_dir, train_file, out, **extra):
    return ["distill", *run_flags(models_dir, train_file, out, **{**STEPS, **extra})]


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(models_dir, train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability") / "straight"
    assert cli.main(flags(models_dir, train_file, out)) == 0
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("mode, when, resumed_from", [("step", 3, 2), ("save", 4, 2)])
def test_killed_run_resumes_to_the_uninterrupted_result(models_dir, train_file, tmp_path, uninterrupted, mode, when,
                                                         resumed_from):
    out = tmp_path / "killed"
    result = subprocess.run([sys.executable, "-c", KILLER, mode, str(when), *flags(models_dir, train_file, out)],
                            capture_output=True, text=True, env=checkout_env(OMP_NUM_THREADS="1"))
    assert result.returncode == -9, result.stderr[-2000:]
    assert resolve_checkpoint(out, "latest").endswith(f"checkpoint-{resumed_from}")
    if mode == "save":
        assert (out / "checkpoint-4").is_dir()  # half written, never resumed from
    assert cli.main([*flags(models_dir, train_file, out), "--resume_from_checkpoint", "latest"]) == 0
    for name, weight in adapter(uninterrupted).items():
        torch.testing.assert_close(adapter(out)[name], weight, rtol=1e-6, atol=1e-6)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [entry["step"] for entry in logged if "loss" in entry]
    assert steps == [1, 2, 3, 4, 5, 6]
    straight = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    for got, expected in zip([e for e in logged if "loss" in e], [e for e in straight if "loss" in e], strict=True):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)


def test_incomplete_or_missing_checkpoints_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no complete checkpoint in .* to resume from"):
        resolve_checkpoint(tmp_path, "latest")
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "llmneo_checkpoint_complete").write_text("2\n")
    (tmp_path / "checkpoint-4").mkdir()
    with pytest.raises(ConfigError, match="checkpoint-4 is incomplete \\(its save was interrupted\\); the newest "
                                          "complete one is .*checkpoint-2"):
        resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-4"))
    assert resolve_checkpoint(tmp_path, "latest") == str(tmp_path / "checkpoint-2")
    with pytest.raises(ConfigError, match="checkpoint .*checkpoint-9 does not exist"):
        resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-9"))


class Fault(TrainerCallback):
    """Makes the forward pass of optimizer step ``step`` produce NaN, or raise out-of-memory."""

    def __init__(self, step, kind="nan"):
        self.step, self.kind, self.active = step, kind, False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layer = next(module for name, module in model.named_modules() if name.endswith("layers.0.mlp"))
        layer.register_forward_hook(self.hook)

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step + 1 == self.step

    def hook(self, module, inputs, output):
        if self.active and module.training:
            if self.kind == "oom":
                raise torch.OutOfMemoryError("injected")
            return output * float("nan")
        return output


def config(models_dir, train_file, out, **extra):
    return parse_config(run_flags(models_dir, train_file, out, max_steps=4, **extra))


@pytest.mark.e2e
def test_nonfinite_step_is_skipped_and_counted(models_dir, train_file, tmp_path, caplog):
    summary = distill(config(models_dir, train_file, tmp_path / "run", nonfinite_policy="skip"), [Fault(2)])
    assert summary.steps == 4 and summary.final_metrics["skipped_steps"] == 1
    assert "non-finite loss or gradient at step 2 (training rows [" in caplog.text and "update skipped" in caplog.text
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.e2e
@pytest.mark.parametrize("extra", [{"nonfinite_policy": "stop"}, {"nonfinite_policy": "skip", "max_bad_steps": 0}])
def test_nonfinite_step_stops_with_its_rows_and_a_checkpoint(models_dir, train_file, tmp_path, extra):
    with pytest.raises(NonFiniteError, match=r"non-finite loss or gradient at step 2 \(training rows \[\d+(, \d+)*\]\)"
                                             r".*saved as checkpoint-1 \(resume with --resume_from_checkpoint latest\)"):
        distill(config(models_dir, train_file, tmp_path / "run", **extra), [Fault(2)])
    assert (tmp_path / "run" / "checkpoint-1" / "llmneo_checkpoint_complete").is_file()


@pytest.mark.e2e
def test_out_of_memory_names_the_micro_batch_and_the_knobs(models_dir, train_file, tmp_path):
    with pytest.raises(TrainingOutOfMemory, match=r"out of memory at step 3 with up to 256 tokens per micro-batch "
                                                  r"\(4 rows x max_length 64\)\. The last good step was saved as "
                                                  r"checkpoint-2.*--auto_micro_batch.*--kd_chunk_size \(now 1024\)"):
        distill(config(models_dir, train_file, tmp_path / "run"), [Fault(3, "oom")])
    assert resolve_checkpoint(tmp_path / "run", "latest").endswith("checkpoint-2")


@pytest.mark.e2e
def test_pickle_weights_are_refused_unless_allowed(tokenizer, train_file, tmp_path):
    from llmneo.demo.tiny import build_tiny_llama

    student = tmp_path / "pickled"
    model = build_tiny_llama(tokenizer, seed=5)
    model.config.save_pretrained(student)  # transformers 5 writes only safetensors: write the pickle by hand
    torch.save(model.state_dict(), student / "pytorch_model.bin")
    tokenizer.save_pretrained(student)
    assert (student / "pytorch_model.bin").is_file() and not list(student.glob("*.safetensors"))
    flags = run_flags({"student": str(student)}, train_file, tmp_path / "run", method="lora", max_steps=1)
    with pytest.raises(ConfigError, match=r"student model .*pickled holds only pickle weights \(pytorch_model.bin\), "
                                          r"which can run code when loaded.*--allow_pickle"):
        distill(parse_config(flags))
    assert distill(parse_config([*flags, "--allow_pickle", "true"])).steps == 1


def test_remote_code_off_and_safetensors_only_by_default(models_dir, train_file, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from llmneo.models.loading import load_student

    seen = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, **kwargs):
        seen.update(kwargs)
        return original(cls, path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    config = parse_config(run_flags(models_dir, train_file, tmp_path, method="lora"))
    load_student(config.model)
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True
