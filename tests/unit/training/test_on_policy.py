"""On-policy steps (training/on_policy.py, rollouts.py, losses/sampled.py): the first step's kd_loss against a
reference written here (greedy answers generated token by token without a KV cache or padding, both models'
logits scored in float64, summed over the generated tokens), the schedule, seeded sampling and accumulation splits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import run_flags
from llmneo.config import parse_config
from llmneo.data.loading import build_dataset
from llmneo.losses.contract import IGNORE_INDEX
from llmneo.models.loading import load_student_tokenizer
from llmneo.pipeline import build_trainer, load_models
from llmneo.teacher.sources import OnlineTeacher
from llmneo.training.on_policy import is_on_policy_step
from llmneo.rollouts import last_prompt, stop_token_ids

NEW_TOKENS = 6


def on_policy_trainer(models_dir, train_file, out, **extra):
    options = {"max_steps": 1, "warmup_steps": 0, "on_policy_fraction": 1, "rollout_temperature": 0,
               "rollout_max_new_tokens": NEW_TOKENS, **extra}
    flags = run_flags(models_dir, train_file, out, **options)
    config = parse_config(flags)
    tokenizer = load_student_tokenizer(config.model)
    dataset, _ = build_dataset(config.data, tokenizer, config.training.seed)
    dataset = dataset.add_column("row_id", list(range(len(dataset))))
    torch.manual_seed(0)
    student, teacher, kd_vocab = load_models(config, tokenizer)
    trainer = build_trainer(config, student, OnlineTeacher(teacher, kd_vocab), dataset, tokenizer)
    return trainer, dataset, tokenizer


def first_step_kd(trainer, rows: list[dict], accumulation: int = 1) -> tuple[float, list[dict]]:
    """kd_loss of the first optimizer step over ``rows`` split into ``accumulation`` micro-batches."""
    size = len(rows) // accumulation
    batches = iter([trainer.data_collator(rows[i * size:(i + 1) * size]) for i in range(accumulation)])
    trainer.state.global_step = 0
    steps, items = trainer.get_batch_samples(batches, accumulation, trainer.args.device)
    trainer.model.train()
    trainer.reset_loss_terms()
    for batch in steps:
        trainer.compute_loss(trainer.model, batch, num_items_in_batch=items)
    return float(trainer.loss_terms()["kd_loss"]), steps


@torch.no_grad()
def greedy_reference(model, prompt: list[int], stops: set[int]) -> list[int]:
    ids = list(prompt)
    for _ in range(NEW_TOKENS):
        token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        if token in stops:
            break
    return ids[len(prompt):]


@torch.no_grad()
def reference_kd(trainer, rows, tokenizer, divergence: str, temperature: float, sampled: bool) -> float:
    # The models as the trainer holds them (no KV cache, no padding, one row at a time); every sum in float64.
    student = copy.deepcopy(trainer.model).eval()
    teacher = copy.deepcopy(trainer.teacher).eval()
    stops = stop_token_ids(tokenizer)
    total, count = 0.0, 0
    for row in rows:
        prompt = last_prompt(torch.tensor(row["input_ids"]), torch.tensor(row["labels"]), None)
        answer = greedy_reference(student, prompt, stops)
        ids = torch.tensor([prompt + answer])
        s_logits, t_logits = student(input_ids=ids).logits[0].double(), teacher(input_ids=ids).logits[0].double()
        vocab = min(s_logits.shape[-1], t_logits.shape[-1])
        for offset, token in enumerate(answer):
            at = len(prompt) + offset - 1  # the position that predicts this answer token
            if sampled:
                total += float(F.log_softmax(s_logits[at], -1)[token] - F.log_softmax(t_logits[at], -1)[token])
            else:
                log_s = F.log_softmax(s_logits[at, :vocab] / temperature, -1)
                log_t = F.log_softmax(t_logits[at, :vocab] / temperature, -1)
                first, second = (log_t, log_s) if divergence == "forward_kl" else (log_s, log_t)
                total += temperature ** 2 * float((first.exp() * (first - second)).sum())
            count += 1
    return total / count


@pytest.mark.parametrize("loss,divergence,temperature", [("full", "forward_kl", 1.0), ("full", "forward_kl", 2.0),
                                                         ("full", "reverse_kl", 1.0), ("full", "reverse_kl", 2.0),
                                                         ("sampled", "forward_kl", 1.0)])
def test_first_step_kd_equals_a_float64_reference(models_dir, train_file, tmp_path, loss, divergence, temperature):
    trainer, dataset, tokenizer = on_policy_trainer(models_dir, train_file, tmp_path / "run", on_policy_loss=loss,
                                                    divergence=divergence, temperature=temperature)
    rows = [dataset[i] for i in range(4)]
    expected = reference_kd(trainer, rows, tokenizer, divergence, temperature, loss == "sampled")
    kd, steps = first_step_kd(trainer, rows)
    # abs 1e-6: a KL of 0.015 per token summed in float32 (the loss's precision, fused or naive) is 2e-5 relative
    # away from the same logits summed in float64.
    assert kd == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert float(trainer.loss_terms()["ce_loss"]) == 0.0


def test_rollout_batches_hold_prompt_then_labelled_answer(models_dir, train_file, tmp_path):
    trainer, dataset, tokenizer = on_policy_trainer(models_dir, train_file, tmp_path / "run")
    rows = [dataset[i] for i in range(4)]
    _, (batch,) = first_step_kd(trainer, rows)
    stops = stop_token_ids(tokenizer)
    for b, row in enumerate(rows):
        prompt = last_prompt(torch.tensor(row["input_ids"]), torch.tensor(row["labels"]), None)
        labels = batch["labels"][b]
        answer = labels[labels != IGNORE_INDEX].tolist()
        assert batch["input_ids"][b, :len(prompt)].tolist() == prompt
        assert batch["input_ids"][b, len(prompt):len(prompt) + len(answer)].tolist() == answer
        assert 1 <= len(answer) <= NEW_TOKENS
        assert len(answer) == NEW_TOKENS or answer[-1] in stops  # cut at the budget, or stopped (stop token kept)


def test_accumulation_splits_give_the_same_step(models_dir, train_file, tmp_path):
    trainer, dataset, _ = on_policy_trainer(models_dir, train_file, tmp_path / "run", rollout_temperature=1.0)
    rows = [dataset[i] for i in range(4)]
    results = [first_step_kd(trainer, rows, accumulation)[0] for accumulation in (1, 2, 4)]
    assert results[1] == pytest.approx(results[0], rel=1e-5)
    assert results[2] == pytest.approx(results[0], rel=1e-5)


def test_seeded_sampling_is_reproducible_and_differs_by_step(models_dir, train_file, tmp_path):
    trainer, dataset, _ = on_policy_trainer(models_dir, train_file, tmp_path / "run", rollout_temperature=1.0,
                                            rollout_max_new_tokens=12)
    batch = trainer.data_collator([dataset[i] for i in range(4)])
    rollouts = trainer.on_policy.rollouts
    first, again = rollouts.batch(trainer.model, batch, 0), rollouts.batch(trainer.model, batch, 0)
    later = rollouts.batch(trainer.model, batch, 1)
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert not torch.equal(first["input_ids"], later["input_ids"])


@pytest.mark.parametrize("fraction,expected", [(0.5, [0, 1, 0, 1, 0, 1]), (1.0, [1] * 6), (0.0, [0] * 6),
                                               (1 / 3, [0, 0, 1, 0, 0, 1]), (0.25, [0, 0, 0, 1, 0, 0])])
def test_schedule_spreads_on_policy_steps_evenly(fraction, expected):
    assert [int(is_on_policy_step(k, fraction)) for k in range(6)] == expected
    assert sum(is_on_policy_step(k, 0.29) for k in range(100)) == 29
