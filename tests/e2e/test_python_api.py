"""The Python API (api.py, config.py, in_memory.py): a run from already-loaded models, a LoraConfig and rows in
memory trains what the command line trains, and the run is evaluated and merged from another folder."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmneo
from conftest import run_flags
from llmneo import cli
from llmneo.api import NeoTrainer
from llmneo.demo.tiny import corpus_rows
from llmneo.errors import ConfigError
from llmneo.in_memory import model_in_memory
from llmneo.runtime.layout import METRICS_FILE, read_metrics

pytestmark = pytest.mark.e2e


def loaded(path: str):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def first_step(run) -> dict:
    return next(entry for entry in read_metrics(run / METRICS_FILE) if "loss" in entry)


def test_loaded_models_and_a_lora_config_train_as_the_command_line_does(models_dir, train_file, tmp_path,
                                                                        monkeypatch, capsys):
    student, tokenizer = loaded(models_dir["student"])
    teacher, _ = loaded(models_dir["teacher"])
    rows = datasets.Dataset.from_list([json.loads(line) for line in open(train_file, encoding="utf-8")])
    args = llmneo.NeoTrainingArguments(output_dir=str(tmp_path / "api"), max_steps=3, per_device_train_batch_size=4,
                                       logging_steps=1, learning_rate=1e-2, disable_tqdm=True, seed=0)
    trainer = llmneo.NeoTrainer(student, teacher_model=teacher, args=args, train_dataset=rows,
                                processing_class=tokenizer, eval_ratio=0.25, max_length=64,
                                peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    summary = trainer.train()
    assert summary.steps == 3
    assert all(model_in_memory(name) is None for name in trainer.in_memory)  # loaders read paths again afterwards
    recorded = (tmp_path / "api" / "config.yaml").read_text(encoding="utf-8")
    assert f"student_model: {models_dir['student']}" in recorded  # loaded from there, unchanged: its path
    assert "dataset: memory:train-" in recorded
    flags = run_flags(models_dir, train_file, tmp_path / "cli", eval_ratio=0.25)
    assert cli.main(["distill", *flags, "--lora_alpha", "8"]) == 0
    ours, theirs = first_step(tmp_path / "api"), first_step(tmp_path / "cli")
    for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "api"), "--dataset", train_file, "--bootstrap", "0"]) == 0
    assert "kl_to_teacher" in json.loads(capsys.readouterr().out)["held_out"]
    assert cli.main(["merge", str(tmp_path / "api"), "--output", "merged"]) == 0
    assert (elsewhere / "merged" / "model.safetensors").is_file()


def test_a_changed_model_is_recorded_by_fingerprint_and_named_when_needed(models_dir, tmp_path, capsys):
    student, tokenizer = loaded(models_dir["student"])
    with torch.no_grad():
        student.lm_head.weight.mul_(1.5)
    trainer = llmneo.NeoTrainer(student, args={"method": "lora", "output_dir": str(tmp_path / "run"), "max_steps": 1,
                                               "lora_r": 4, "disable_tqdm": True, "max_length": 64},
                                train_dataset=corpus_rows()[:8], processing_class=tokenizer)
    trainer.train()
    name = trainer.config.model.student_model
    assert name.startswith("memory:student-")
    capsys.readouterr()
    assert cli.main(["merge", str(tmp_path / "run"), "--output", str(tmp_path / "merged")]) == 1
    assert capsys.readouterr().err.strip() == (f"llm-neo merge: error: student model {name} was an in-memory model of "
                                               "the process that trained the run, saved nowhere: save it "
                                               "(save_pretrained) and give its path")


def test_a_model_in_memory_needs_its_tokenizer(models_dir, tmp_path):
    student, _ = loaded(models_dir["student"])
    with torch.no_grad():
        student.lm_head.weight.mul_(1.5)
    trainer = llmneo.NeoTrainer(student, args={"method": "lora", "output_dir": str(tmp_path / "run")},
                                train_dataset=corpus_rows()[:8])
    with pytest.raises(ConfigError, match=r"the student model was given in memory without its tokenizer: give that "
                                          r"too \(processing_class="):
        trainer.train()



def test_the_public_names_are_the_api_modules():
    from llmneo.config import NeoTrainingArguments, RunConfig
    from llmneo.pipeline import distill

    assert (llmneo.NeoTrainer, llmneo.NeoTrainingArguments, llmneo.RunConfig, llmneo.distill) == \
        (NeoTrainer, NeoTrainingArguments, RunConfig, distill)
    with pytest.raises(AttributeError, match="module 'llmneo' has no attribute 'Trainer'"):
        llmneo.Trainer  # noqa: B018
