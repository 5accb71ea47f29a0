"""The teacher-signal interface (teacher/signal.py): a new source is one class. A toy source defined here alone
trains a step through the real trainer, and its KD term equals a naive reference written in this test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_flags
from llmneo.config import parse_config
from llmneo.data.loading import build_dataset
from llmneo.losses.contract import IGNORE_INDEX
from llmneo.losses.targets import Logits, StudentSide, TokenTargets
from llmneo.models.loading import load_student_tokenizer
from llmneo.teacher.choice import load_models
from llmneo.training.setup import build_trainer
from llmneo.teacher.signal import NoTeacher, TeacherSignal
from llmneo.training.token_level import TokenDistillTrainer


class UniformTeacher(TeacherSignal):
    """A teacher equally unsure of every token: zero logits over the student's vocabulary."""

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.calls = 0

    def targets(self, inputs: dict, student: StudentSide) -> TokenTargets:
        self.calls += 1
        rows, length = inputs["input_ids"].shape
        return TokenTargets(Logits(torch.zeros(rows, length, self.vocab)))

    def identity(self) -> dict:
        return {"uniform_over": self.vocab}


def naive_terms(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean CE and mean KL(uniform || student) over the answer tokens, position by position."""
    ce = kl = 0.0
    count = 0
    for row in range(labels.shape[0]):
        for position in range(labels.shape[1] - 1):
            target = int(labels[row, position + 1])
            if target == IGNORE_INDEX:
                continue
            log_p = F.log_softmax(logits[row, position].double(), -1)
            ce -= float(log_p[target])
            kl += float((-math.log(logits.shape[-1]) - log_p).mean())
            count += 1
    return ce / count, kl / count


def close_to(value: float):
    return pytest.approx(value, rel=1e-5, abs=1e-6)


def trainer_with(signal, models_dir, train_file, out, **extra):
    config = parse_config(run_flags(models_dir, train_file, out, max_steps=1, alpha=0.3, warmup_steps=0, **extra))
    tokenizer = load_student_tokenizer(config.model)
    dataset, _ = build_dataset(config.data, tokenizer, config.training.seed)
    torch.manual_seed(0)
    return build_trainer(config, load_models(config, tokenizer), signal, dataset), dataset


def first_batch_step(trainer, dataset):
    """The naive CE and KL of four rows before any step, then the trainer's loss of the same rows."""
    batch = trainer.data_collator([dataset[i] for i in range(4)])
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    trainer.model.train()
    return naive_terms(logits, batch["labels"]), trainer.compute_loss(trainer.model, batch)


def test_a_toy_source_trains_a_step_with_its_own_targets(models_dir, train_file, tmp_path):
    vocab = len(load_student_tokenizer(parse_config(run_flags(models_dir, train_file, tmp_path)).model))
    signal = UniformTeacher(vocab)
    trainer, dataset = trainer_with(signal, models_dir, train_file, tmp_path / "run")
    assert isinstance(trainer, TokenDistillTrainer) and trainer.signal is signal
    (ce, kl), loss = first_batch_step(trainer, dataset)
    terms = trainer.loss_terms()
    assert float(terms["ce_loss"]) == close_to(ce)
    assert float(terms["kd_loss"]) == close_to(kl)
    assert float(loss.detach()) == close_to(0.3 * ce + 0.7 * kl)

    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.reset_loss_terms()
    trainer.train()
    assert trainer.state.global_step == 1 and signal.calls >= 2
    changed = [name for name, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[name])]
    assert changed and all("lora" in name for name in changed)


def test_without_a_signal_the_trainer_has_no_teacher_and_computes_ce_only(models_dir, train_file, tmp_path):
    trainer, dataset = trainer_with(NoTeacher(), models_dir, train_file, tmp_path / "run", method="lora")
    (ce, _), loss = first_batch_step(trainer, dataset)
    assert trainer.teacher is None
    assert float(loss) == close_to(ce) and float(trainer.loss_terms()["kd_loss"]) == 0.0


class UniformSource(UniformTeacher):
    """The toy source as a run chooses it: registered in this test alone, chosen by its own teacher name, built
    from the run's models."""

    NAME = "uniform-teacher"
    built: list = []

    @classmethod
    def chosen(cls, config) -> bool:
        return config.model.teacher_model == cls.NAME

    @classmethod
    def build(cls, config, parts):
        source = cls(len(parts.models.tokenizer))
        cls.built.append(source)
        return source


def test_a_registered_source_is_chosen_and_built_by_the_pipeline(models_dir, train_file, tmp_path):
    """`distill` asks the one place that chooses sources: a source registered here trains a whole run, nothing
    else in the pipeline knowing of it; unregistered, the same settings choose a loaded teacher again."""
    import json

    from llmneo.pipeline import distill
    from llmneo.teacher.choice import register_source, source_kind, unregister_source

    config = parse_config(run_flags(models_dir, train_file, tmp_path / "run", teacher=UniformSource.NAME, max_steps=2))
    register_source(UniformSource)
    try:
        assert source_kind(config) is UniformSource
        summary = distill(config)
    finally:
        unregister_source(UniformSource)
    (source,) = UniformSource.built
    assert summary.steps == 2 and source.calls >= 2
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "kd_loss" in row] == [1, 2]
    assert all(row["kd_loss"] > 0 for row in logged if "kd_loss" in row)
    assert source_kind(config).__name__ == "OnlineTeacher"
