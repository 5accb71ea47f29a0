"""On-policy steps (training/on_policy.py, rollouts.py, losses/sampled.py): the first step's kd_loss against a
reference written here (greedy answers generated token by token without a KV cache or padding, both models'
logits scored in float64, summed over the generated tokens), the schedule, seeded sampling and accumulation splits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import run_flags
from rollout_reference import answered_rows
from llmneo.config import parse_config
from llmneo.data.loading import TeacherSide, build_dataset
from llmneo.losses.contract import IGNORE_INDEX
from llmneo.models.loading import load_student_tokenizer
from llmneo.teacher.choice import load_models, reading_teacher_tokenizer, teacher_signal
from llmneo.training.setup import build_trainer
from llmneo.teacher.sources import AlignedOnlineTeacher, OnlineTeacher
from llmneo.training.on_policy import is_on_policy_step
from llmneo.rollouts import last_prompt, stop_token_ids

NEW_TOKENS = 6


def on_policy_trainer(models_dir, train_file, out, **extra):
    """A one-step on-policy trainer with greedy rollouts; with ``cross_tokenizer`` its teacher reads its own
    rendering of the rows (the pipeline's teacher source and the rows' prompt messages)."""
    options = {"max_steps": 1, "warmup_steps": 0, "on_policy_fraction": 1, "rollout_temperature": 0,
               "rollout_max_new_tokens": NEW_TOKENS, **extra}
    flags = run_flags(models_dir, train_file, out, **options)
    config = parse_config(flags)
    tokenizer = load_student_tokenizer(config.model)
    teacher_tokenizer = reading_teacher_tokenizer(config)
    dataset, _ = build_dataset(config.data, tokenizer, config.training.seed,
                               TeacherSide(teacher_tokenizer, keep_prompts=teacher_tokenizer is not None))
    dataset = dataset.add_column("row_id", list(range(len(dataset))))
    torch.manual_seed(0)
    models = load_models(config, tokenizer, teacher_tokenizer=teacher_tokenizer)
    (out).mkdir(parents=True, exist_ok=True)
    signal = teacher_signal(config, models, dataset=dataset)
    assert isinstance(signal, AlignedOnlineTeacher if teacher_tokenizer else OnlineTeacher)
    trainer = build_trainer(config, models, signal, dataset)
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


# ---------------------------------------------------------------- across tokenizers


def answered_step_kd(trainer, rows: list[dict]) -> float:
    batch, _, answers = answered_rows(trainer, rows)
    trainer.model.train()
    trainer.reset_loss_terms()
    trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(sum(map(len, answers))))
    return float(trainer.loss_terms()["kd_loss"])


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_across_one_tokenizer_equals_the_one_tokenizer_step(models_dir, train_file, tmp_path, loss):
    """--cross_tokenizer exact with the student's own tokenizer: every answer token is its own aligned span, so
    the step equals the one-tokenizer step (itself checked against the float64 reference above)."""
    same, dataset, _ = on_policy_trainer(models_dir, train_file, tmp_path / "same", on_policy_loss=loss)
    across, aligned, _ = on_policy_trainer(models_dir, train_file, tmp_path / "across", on_policy_loss=loss,
                                           cross_tokenizer="exact")
    expected = answered_step_kd(same, [dataset[i] for i in range(4)])
    assert expected != 0 and answered_step_kd(across, [aligned[i] for i in range(4)]) == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def reference_across(trainer, rows, sampled: bool) -> float:
    """Each answer aligned with the teacher's rendering of its prompt and text (the alignment is checked against
    decoding in test_cross_tokenizer.py); float64 logits of both models. ``sampled``: per aligned byte span, the
    student's log-probability of its tokens in it minus the teacher's of its own; ``full``: forward KL over
    [mapped pairs, rest] (exact mode) at each aligned boundary. Summed, over the answer tokens."""
    signal = trainer.signal
    student, teacher = copy.deepcopy(trainer.model).eval(), copy.deepcopy(trainer.teacher).eval()
    mapping = signal.vocab_map.to("cpu")
    _, prompts, answers = answered_rows(trainer, rows)
    total, spans = 0.0, 0
    for row, prompt, answer in zip(rows, prompts, answers, strict=True):
        alignment = signal.answers.align(row["row_id"], answer, len(prompt))
        ids, teacher_ids = prompt + answer, alignment.teacher_input_ids
        log_s = F.log_softmax(student(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        log_t = F.log_softmax(teacher(input_ids=torch.tensor([teacher_ids])).logits[0].double(), -1)
        pairs = list(zip(alignment.student_positions, alignment.teacher_positions, strict=True))
        if sampled:
            ends = pairs[1:] + ([alignment.end] if alignment.end else [])
            spans += len(ends)
            for (s, t), (s_end, t_end) in zip(pairs, ends, strict=False):
                total += sum(float(log_s[p, ids[p + 1]]) for p in range(s, s_end))
                total -= sum(float(log_t[p, teacher_ids[p + 1]]) for p in range(t, t_end))
        else:
            spans += len(pairs)
            for s, t in pairs:
                p_s, p_t = log_s[s].exp(), log_t[t].exp()
                q_s = torch.cat([p_s[mapping.student_ids], (1 - p_s[mapping.student_ids].sum())[None]])
                q_t = torch.cat([p_t[mapping.teacher_ids], (1 - p_t[mapping.teacher_ids].sum())[None]])
                total += float((q_t * (q_t.log() - q_s.log())).sum())
    assert spans > sum(map(len, answers)) / 2  # the answers' text aligns (not only their first bytes)
    return total / sum(map(len, answers))


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_across_tokenizers_step_equals_a_float64_reference(models_dir, train_file, tmp_path, char_teacher, loss):
    """A BPE student and a character-level teacher with another chat template: the student's answers re-rendered
    for the teacher, its multi-character tokens against the teacher's characters."""
    trainer, dataset, _ = on_policy_trainer(models_dir, train_file, tmp_path / "run", on_policy_loss=loss,
                                            cross_tokenizer="exact", teacher=char_teacher)
    rows = [dataset[i] for i in range(4)]
    expected = reference_across(trainer, rows, loss == "sampled")
    assert expected != 0 and answered_step_kd(trainer, rows) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert float(trainer.loss_terms()["ce_loss"]) == 0.0


def test_across_tokenizers_greedy_step_runs_the_rollouts(models_dir, train_file, tmp_path, char_teacher):
    """The whole path with generation: rollouts replace the batch and the teacher scores what aligns."""
    trainer, dataset, _ = on_policy_trainer(models_dir, train_file, tmp_path / "run", cross_tokenizer="exact",
                                            teacher=char_teacher)
    kd, (batch,) = first_step_kd(trainer, [dataset[i] for i in range(4)])
    assert "rollout" in batch and kd > 0 and torch.isfinite(torch.tensor(kd))


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


def test_a_row_without_a_prompt_is_named(models_dir, train_file, tmp_path):
    """A row whose labels start at its first token (no prompt) is named by its row id, not a reshape error."""
    from llmneo.errors import DataError

    trainer, dataset, _ = on_policy_trainer(models_dir, train_file, tmp_path / "run")
    rows = [dict(dataset[i]) for i in range(2)]
    rows[1]["labels"] = list(rows[1]["input_ids"])
    batch = trainer.data_collator(rows)
    with pytest.raises(DataError, match=f"training row {rows[1]['row_id']} has no prompt before its answer"):
        trainer.on_policy.rollouts.batch(trainer.model, batch, 0)
