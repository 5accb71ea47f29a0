"""--auto_micro_batch: the choice against a budget, rows per optimizer step unchanged, and the same training."""

import json

import pytest
import torch

from conftest import run_flags
from llmneo.runtime import planner
from llmneo.config import parse_config
from llmneo.pipeline import distill

GIB = 2**30


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_planned_run_trains_like_the_same_rows_per_step(models_dir, train_file, tmp_path):
    planned = tmp_path / "planned"
    distill(parse_config(run_flags(models_dir, train_file, planned, per_device_train_batch_size=1,
                                   gradient_accumulation_steps=4, auto_micro_batch=True,
                                   auto_micro_batch_budget_gib=1000, optim="sgd")))
    explicit = tmp_path / "explicit"
    distill(parse_config(run_flags(models_dir, train_file, explicit, per_device_train_batch_size=4,
                                   gradient_accumulation_steps=1, optim="sgd")))
    for got, expected in zip(metrics(planned), metrics(explicit), strict=True):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm", "epoch"):
            if key in expected:
                assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-7), key


class FakeTrainer:
    class Args:
        per_device_train_batch_size, gradient_accumulation_steps = 2, 4
        train_batch_size = property(lambda self: self.per_device_train_batch_size)

    def __init__(self):
        self.args = self.Args()

    def set_micro_batch(self, micro_batch, accumulation):
        self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps = micro_batch, accumulation


def test_the_largest_divisor_within_the_budget_is_chosen(monkeypatch):
    peaks = {1: 1 * GIB, 2: 2 * GIB, 4: 4 * GIB, 8: None}
    probed = []
    monkeypatch.setattr(planner, "_probe", lambda trainer, rows: probed.append(len(rows)) or peaks[len(rows)])
    trainer = FakeTrainer()
    rows = [{"input_ids": [1] * n} for n in (5, 9, 7)]
    plan = planner.plan_micro_batch(trainer, rows, budget_gib=2.5)
    assert (plan.micro_batch, plan.accumulation) == (2, 4) and probed == [1, 2, 4]  # 8 rows per step kept
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (2, 4)
    assert plan.tokens_per_micro_batch == 9 + 7  # the longest rows
    plan = planner.plan_micro_batch(FakeTrainer(), rows, budget_gib=100)
    assert (plan.micro_batch, plan.accumulation) == (4, 2)  # 8 ran out of memory
    with pytest.raises(torch.OutOfMemoryError, match="even one row of 9 tokens needs more than the 0.5 GiB budget"):
        planner.plan_micro_batch(FakeTrainer(), rows, budget_gib=0.5)
