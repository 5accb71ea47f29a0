"""TRL's DistillationTrainer example with its import line changed to llmneo.trl: it trains what `llm-neo distill`
trains with the same settings, and its first step's loss equals TRL 1.16's own trainer on the same models."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest
from peft import LoraConfig
from transformers import AutoTokenizer, GenerationConfig

from llmneo import cli
from llmneo.runtime.layout import METRICS_FILE, read_metrics

pytestmark = pytest.mark.e2e

CANDIDATES = ["What colour is the sky?", "Name a big city.", "Why is the sea salty?", "Who wrote this book?",
              "What is a cat?", "Where is the moon?", "How do birds fly?", "What is rain?"]


@pytest.fixture(scope="module")
def trl_models(models_dir, tmp_path_factory):
    """The tests' student and teacher, whose generation config also stops at the template's end of turn (as
    llm-neo's rollouts do), so that both trainers end a completion at the same token."""
    root = tmp_path_factory.mktemp("trl_models")
    for name in ("student", "teacher"):
        shutil.copytree(models_dir[name], root / name)
        tokenizer = AutoTokenizer.from_pretrained(root / name)
        stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
        GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id).save_pretrained(root / name)
    return {name: str(root / name) for name in ("student", "teacher")}


def prompt_rows(tokenizer, count: int = 2) -> list[dict]:
    """Conversational prompts of one token length: no padding, so that no position ids depend on it."""
    by_length: dict[int, list] = {}
    for text in CANDIDATES:
        prompt = [{"role": "user", "content": text}]
        by_length.setdefault(len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)),
                             []).append(prompt)
    same = next(group for group in by_length.values() if len(group) >= count)
    return [{"prompt": prompt} for prompt in same[:count]]


def first_step(run) -> dict:
    return next(entry for entry in read_metrics(run / METRICS_FILE) if "loss" in entry)


def settings(output_dir, **extra) -> dict:
    return dict(output_dir=str(output_dir), max_completion_length=8, per_device_train_batch_size=2, max_steps=1,
                logging_steps=1, learning_rate=1e-3, seed=0, disable_tqdm=True, **extra)


def test_the_trl_example_trains_what_the_command_line_trains(trl_models, tmp_path):
    from llmneo.trl import DistillationConfig, DistillationTrainer  # the one line changed from `from trl import ...`

    tokenizer = AutoTokenizer.from_pretrained(trl_models["student"])
    rows = prompt_rows(tokenizer)
    dataset = datasets.Dataset.from_list(rows)
    trainer = DistillationTrainer(model=trl_models["student"], teacher_model=trl_models["teacher"],
                                  args=DistillationConfig(**settings(tmp_path / "trl", beta=0.5)), train_dataset=dataset,
                                  processing_class=tokenizer, peft_config=LoraConfig(r=4, target_modules="all-linear"))
    trainer.train()
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    flags = ["--student_model", trl_models["student"], "--teacher_model", trl_models["teacher"], "--dataset",
             str(data), "--output_dir", str(tmp_path / "cli"), "--on_policy_fraction", "1", "--alpha", "0",
             "--divergence", "jsd", "--jsd_beta", "0.5", "--rollout_max_new_tokens", "8", "--lora_r", "4",
             "--lora_alpha", "8", "--per_device_train_batch_size", "2", "--max_steps", "1", "--logging_steps", "1",
             "--learning_rate", "1e-3", "--seed", "0", "--disable_tqdm", "true"]
    assert cli.main(["distill", *flags]) == 0
    ours, theirs = first_step(tmp_path / "trl"), first_step(tmp_path / "cli")
    for key in ("loss", "kd_loss", "grad_norm", "rollout_tokens"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_the_first_loss_equals_trls_own_trainer(trl_models, tmp_path, beta):
    """Greedy completions on both sides (TRL top_k=1, llm-neo temperature 0 through the same option), T = 1."""
    import trl  # installed by the README's install command (--no-deps: its pins agree with llm-neo's)
    from llmneo.trl import DistillationConfig, DistillationTrainer

    tokenizer = AutoTokenizer.from_pretrained(trl_models["student"])
    dataset = datasets.Dataset.from_list(prompt_rows(tokenizer))
    lora = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    theirs = trl.DistillationTrainer(
        model=trl_models["student"], teacher_model=trl_models["teacher"], train_dataset=dataset,
        processing_class=tokenizer, peft_config=LoraConfig(**lora),
        args=trl.DistillationConfig(**settings(tmp_path / "theirs", beta=beta, top_k=1), bf16=False, report_to=[],
                                    gradient_checkpointing=False, save_strategy="no", use_cpu=True))
    theirs.train()
    ours = DistillationTrainer(model=trl_models["student"], teacher_model=trl_models["teacher"], train_dataset=dataset,
                               processing_class=tokenizer, peft_config=LoraConfig(**lora),
                               args=DistillationConfig(**settings(tmp_path / "ours", beta=beta, top_k=1)))
    ours.train()
    trl_loss = next(entry["loss"] for entry in theirs.state.log_history if "loss" in entry)
    step = first_step(tmp_path / "ours")
    print(f"beta {beta}: llm-neo {step['loss']:.6f}, TRL {trl_loss:.6f}, {step['rollout_tokens']} completion tokens")
    assert step["rollout_tokens"] > 0 and step["loss"] > 1e-3  # a real comparison, not two zeros
    assert step["loss"] == pytest.approx(trl_loss, abs=1e-4)


def test_prompt_only_rows_train_on_policy_steps_only(trl_models, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Why is the sea salty?"}) + "\n", encoding="utf-8")
    flags = ["--student_model", trl_models["student"], "--teacher_model", trl_models["teacher"], "--dataset",
             str(data), "--output_dir", str(tmp_path / "run"), "--on_policy_fraction", "0.5", "--max_steps", "1"]
    assert cli.main(["distill", *flags]) == 1
    assert capsys.readouterr().err.strip().endswith(f"{data} has prompt-only rows: there is no answer to learn from "
                                                    "but the student's own; set on_policy_fraction 1 (now 0.5)")
