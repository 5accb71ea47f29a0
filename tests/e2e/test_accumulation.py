"""One optimizer step through the trainer: the same loss and gradients whether it is 1x8, 2x4 or 8x1 micro-batches,
and the logged terms mixed with the configured alpha and temperature (not 1 - alpha, not T = 1), checked at
alpha = 0.2, T = 2 against CE and KD written out here from both models' logits."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import run_flags
from llmneo.config import parse_config
from llmneo.data.loading import build_dataset
from llmneo.data.collators import make_collator
from llmneo.models.loading import load_student_tokenizer
from llmneo.teacher.choice import load_models, teacher_signal
from llmneo.training.setup import build_trainer

SPLITS = [(8, 1), (4, 2), (1, 8)]  # (micro-batch size, accumulation steps)


def make_trainer(models_dir, train_file, out, method="neo", batch=8, accumulation=1, **extra):
    flags = run_flags(models_dir, train_file, out, method=method, per_device_train_batch_size=batch,
                      gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", warmup_steps=0,
                      lr_scheduler_type="constant", learning_rate=0.5, **extra)
    config = parse_config(flags)
    tokenizer = load_student_tokenizer(config.model)
    dataset, _ = build_dataset(config.data, tokenizer, config.training.seed)
    dataset = dataset.select(range(8))
    torch.manual_seed(0)
    models = load_models(config, tokenizer)
    return build_trainer(config, models, teacher_signal(config, models), dataset), dataset, tokenizer


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def test_padding_differs_between_micro_batches(models_dir, train_file, tmp_path):
    _, dataset, _ = make_trainer(models_dir, train_file, tmp_path)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    assert len(set(lengths)) > 1  # otherwise the splits below would not exercise per-micro-batch padding


@pytest.mark.parametrize("method", ["neo", "sft"])
def test_compute_loss_gradients_independent_of_split(models_dir, train_file, tmp_path, method):
    trainer, dataset, tokenizer = make_trainer(models_dir, train_file, tmp_path, method=method)
    model, collator = trainer.model, make_collator(tokenizer)
    model.train()
    total = sum(sum(label != -100 for label in labels[1:]) for labels in dataset["labels"])
    results = []
    for size, _ in SPLITS:
        model.zero_grad()
        loss = 0.0
        for start in range(0, 8, size):
            batch = collator([dataset[i] for i in range(start, start + size)])
            micro = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(total))
            micro.backward()
            loss += micro.item()
        results.append((loss, {n: p.grad.clone() for n, p in trainable(model).items()}))
    (loss_ref, grads_ref) = results[0]
    for loss, grads in results[1:]:
        assert loss == pytest.approx(loss_ref, rel=1e-5, abs=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, grads_ref[name], atol=1e-5, rtol=1e-4)


@pytest.mark.e2e
def test_trainer_step_independent_of_split(models_dir, train_file, tmp_path):
    """Through the real Trainer loop (num_items_in_batch counted by the Trainer, SGD so the update is the
    gradient): the same logged loss and the same adapter weights after the step."""
    outcomes = []
    for size, accumulation in SPLITS:
        out = tmp_path / f"run-{size}x{accumulation}"
        trainer, _, _ = make_trainer(models_dir, train_file, out, batch=size, accumulation=accumulation)
        trainer.train()
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        step_log = next(entry for entry in logged if "ce_loss" in entry)
        weights = {n: p.detach().clone() for n, p in trainable(trainer.model).items()}
        outcomes.append((step_log, weights))
    reference_log, reference_weights = outcomes[0]
    for step_log, weights in outcomes[1:]:
        for key in ("loss", "ce_loss", "kd_loss"):
            assert step_log[key] == pytest.approx(reference_log[key], rel=1e-4)
        for name, value in weights.items():
            torch.testing.assert_close(value, reference_weights[name], atol=1e-5, rtol=1e-4)


ALPHA, TEMPERATURE = 0.2, 2.0


def reference_terms(student, teacher, batch):
    """Mean CE and T^2 * KL(p_t || p_s) at temperature T over the shifted answer tokens, one token at a time."""
    with torch.no_grad():
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce, kd, count = 0.0, 0.0, 0
    labels = batch["labels"]
    for row in range(labels.shape[0]):
        for position in range(labels.shape[1] - 1):
            target = int(labels[row, position + 1])
            if target == -100:
                continue
            count += 1
            z_s, z_t = student_logits[row, position].double(), teacher_logits[row, position].double()
            ce += float(torch.logsumexp(z_s, 0) - z_s[target])
            log_p_s = F.log_softmax(z_s / TEMPERATURE, 0)
            log_p_t = F.log_softmax(z_t / TEMPERATURE, 0)
            kd += float((log_p_t.exp() * (log_p_t - log_p_s)).sum()) * TEMPERATURE**2
    return ce / count, kd / count


@pytest.mark.parametrize("loss_impl", ["fused", "naive"])
def test_logged_terms_combine_with_alpha_and_temperature(models_dir, train_file, tmp_path, loss_impl):
    from llmneo.data.collators import make_collator

    trainer, dataset, tokenizer = make_trainer(models_dir, train_file, tmp_path, alpha=ALPHA, temperature=TEMPERATURE,
                                               loss_impl=loss_impl)
    batch = make_collator(tokenizer)([dataset[i] for i in range(4)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).detach()
    terms = trainer.loss_terms()
    ce, kd = float(terms["ce_loss"]), float(terms["kd_loss"])
    assert abs(ce - kd) > 0.05  # otherwise swapping the weights would go unnoticed
    assert float(loss) == pytest.approx(ALPHA * ce + (1 - ALPHA) * kd, rel=1e-5)
    reference_ce, reference_kd = reference_terms(trainer.model, trainer.teacher, batch)
    assert ce == pytest.approx(reference_ce, rel=1e-4)
    assert kd == pytest.approx(reference_kd, rel=1e-4)
