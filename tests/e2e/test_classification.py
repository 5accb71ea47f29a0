"""Sequence-classification KD (--task classification): loss, metrics, data, and tiny end-to-end runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import run_flags, write_jsonl
from llmneo.artifacts import load_run_config, load_run_model, merge_run
from llmneo.cli import main
from llmneo.config import parse_config
from llmneo.data.loading import build_datasets
from llmneo.demo.tiny import corpus_texts
from llmneo.errors import ConfigError, DataError, VocabularyError
from llmneo.evaluation.classification import classification_scores
from llmneo.losses.classification import classification_distillation_loss
from llmneo.losses.contract import LossSettings
from llmneo.losses.divergences import get_divergence
from llmneo.pipeline import distill


def naive_loss(student, labels, teacher, alpha, temperature, divergence, count):
    """The textbook formula, written out per example."""
    total = torch.zeros(())
    for s, y, t in zip(student, labels, teacher, strict=True):
        ce = -torch.log_softmax(s, -1)[y]
        p_t, p_s = torch.softmax(t / temperature, -1), torch.softmax(s / temperature, -1)
        if divergence == "forward_kl":
            d = (p_t * (p_t.log() - p_s.log())).sum()
        else:
            d = (p_s * (p_s.log() - p_t.log())).sum()
        total = total + alpha * ce + (1 - alpha) * temperature**2 * d
    return total / count


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("alpha,temperature", [(0.5, 2.0), (0.0, 1.0), (1.0, 3.0), (0.3, 0.7)])
def test_loss_equals_naive_values_and_gradients(divergence, alpha, temperature):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 3, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(6, 3, generator=generator, dtype=torch.float64) * 3
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    ours_input = student.clone().requires_grad_(True)
    settings = LossSettings(alpha=alpha, temperature=temperature, divergence=get_divergence(divergence))
    ours = classification_distillation_loss(ours_input, labels, teacher, settings=settings, num_items=10)
    ours.loss.backward()
    reference_input = student.clone().requires_grad_(True)
    reference = naive_loss(reference_input, labels, teacher, alpha, temperature, divergence, 10)
    reference.backward()
    assert ours.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(ours_input.grad, reference_input.grad, rtol=1e-5, atol=1e-7)
    if alpha == 1.0:  # the KD term is logged even when it carries no weight
        assert ours.kd.item() > 0


def test_loss_split_into_micro_batches_sums_to_the_whole_batch():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(8, 2, generator=generator), torch.randn(8, 2, generator=generator)
    labels = torch.randint(0, 2, (8,), generator=generator)
    whole = classification_distillation_loss(student, labels, teacher, settings=LossSettings(temperature=2.0))
    halves = [classification_distillation_loss(student[i:i + 4], labels[i:i + 4], teacher[i:i + 4],
                                               settings=LossSettings(temperature=2.0), num_items=8) for i in (0, 4)]
    assert (halves[0].loss + halves[1].loss).item() == pytest.approx(whole.loss.item(), rel=1e-6)


def test_ce_only_without_teacher():
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 1])
    parts = classification_distillation_loss(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits, labels)
    assert parts.loss.item() == pytest.approx(expected.item()) and parts.kd.item() == 0.0


@pytest.mark.parametrize("num_labels", [2, 4])
def test_scores_equal_scikit_learn(num_labels):
    generator = torch.Generator().manual_seed(num_labels)
    references = torch.randint(0, num_labels, (200,), generator=generator)
    predictions = torch.randint(0, num_labels - 1, (200,), generator=generator)  # the last class is never predicted
    ours = classification_scores(predictions, references, num_labels)
    average = "binary" if num_labels == 2 else "macro"
    expected = {"accuracy": accuracy_score(references, predictions),
                "precision": precision_score(references, predictions, average=average, zero_division=0),
                "recall": recall_score(references, predictions, average=average, zero_division=0),
                "f1": f1_score(references, predictions, average=average, zero_division=0)}
    assert ours == pytest.approx(expected)


# --- data -------------------------------------------------------------------------------------------------------


def labelled_rows(count: int, offset: int = 0) -> list[dict]:
    """Texts from the shipped corpus, labelled by whether they ask a question (learnable from the last token)."""
    texts = [t for t in corpus_texts() if len(t) < 120][offset: offset + count]
    return [{"text": t, "label": "question" if t.rstrip().endswith("?") else "statement"} for t in texts]


def data_args(path: str, **extra):
    return parse_config(["--student_model", "s", "--dataset", path, "--method", "lora", "--task", "classification",
                         *[item for key, value in extra.items() for item in (f"--{key}", str(value))]]).data


def test_labels_are_sorted_names_or_the_given_order(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", labelled_rows(20))
    train, _, report = build_datasets(data_args(path), tokenizer, seed=0)
    assert report.class_names == ["question", "statement"] and report.data_format == "classification"
    assert train["labels"] == [0 if row["label"] == "question" else 1 for row in labelled_rows(20)]
    assert train["input_ids"][0] == tokenizer(labelled_rows(1)[0]["text"])["input_ids"]
    _, _, given = build_datasets(data_args(path, class_names="statement,question"), tokenizer, seed=0)
    assert given.class_names == ["statement", "question"]


def test_integer_labels_are_class_ids(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a b", "label": i % 3} for i in range(6)])
    train, _, report = build_datasets(data_args(path), tokenizer, seed=0)
    assert report.class_names == ["0", "1", "2"] and train["labels"] == [0, 1, 2, 0, 1, 2]


def test_held_out_rows_use_the_training_classes(tmp_path, tokenizer):
    train_path = write_jsonl(tmp_path / "train.jsonl", labelled_rows(10))
    held_out_path = write_jsonl(tmp_path / "test.jsonl", labelled_rows(4, 10) + [{"text": "fine", "label": "maybe"}])
    with pytest.raises(DataError, match=r"test.jsonl, row 5, field 'label': unknown class 'maybe' "
                                        r"\(classes: question, statement\)"):
        build_datasets(data_args(train_path, eval_split=held_out_path), tokenizer, seed=0)


@pytest.mark.parametrize("row,message", [
    ({"text": "x", "label": 7}, r"row 2, field 'label': class id 7 is outside 0..1 \(classes: neg, pos\)"),
    ({"text": "x", "label": 0.5}, r"row 2, field 'label': class id 0.5 is not an integer"),
    ({"text": "x", "label": [1]}, r"row 2, field 'label': expected a class name or an integer class id, got list"),
    ({"text": "", "label": 1}, r"row 2, field 'text': empty text"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, tokenizer, row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "ok", "label": 1}, row])
    with pytest.raises(DataError, match=message):
        build_datasets(data_args(path, class_names="neg,pos"), tokenizer, seed=0)


@pytest.mark.parametrize("flag,message", [
    (["--packing", "true"], "packing is for --task causal_lm"),
    (["--loss_impl", "liger"], r"loss_impl liger .*\(it is for --task causal_lm\), not --task classification"),
    (["--data_format", "sharegpt"], "--task classification reads text\\+label rows"),
])
def test_causal_only_options_are_refused(flag, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["--student_model", "s", "--dataset", "d.jsonl", "--method", "lora", "--task", "classification",
                      *flag])


def test_sst2_recipe_sets_the_published_options_and_flags_override():
    config = parse_config(["--recipe", "sst2", "--student_model", "s", "--teacher_model", "t", "--dataset", "d.jsonl",
                           "--teacher_quantization", "none"])
    assert (config.data.task, config.training.method, config.training.alpha, config.training.temperature) == \
        ("classification", "neo", 0.5, 2.0)
    assert (config.adapter.lora_r, config.adapter.lora_alpha, config.adapter.target_modules) == (4, 8.0, "qkv")
    assert config.model.teacher_quantization == "none"
    assert parse_config(["--recipe", "sst2", "--student_model", "s", "--teacher_model", "t",
                         "--dataset", "d.jsonl"]).model.teacher_quantization == "nf4"


# --- end to end -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classification_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("classification")
    return {"train": write_jsonl(root / "train.jsonl", labelled_rows(96)),
            "test": write_jsonl(root / "test.jsonl", labelled_rows(48, 96))}


def classify_flags(models, data, out, method, **extra):
    flags = run_flags(models, data["train"], out, method, task="classification", eval_split=data["test"],
                      max_steps=extra.pop("max_steps", 12), **{"per_device_train_batch_size": 8, **extra})
    return flags


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, models_dir, classification_data):
    """The tiny teacher fine-tuned as a classifier (sft), the way a real teacher is prepared."""
    out = tmp_path_factory.mktemp("teacher-run")
    summary = distill(parse_config(classify_flags(models_dir, classification_data, out, "sft",
                                                  student_model=models_dir["teacher"], max_steps=24)))
    return str(summary.weights_dir), summary


@pytest.mark.e2e
def test_teacher_learns_the_task(trained_teacher):
    _, summary = trained_teacher
    assert summary.final_metrics["eval_accuracy"] >= 0.8
    assert set(summary.final_metrics) >= {"eval_accuracy", "eval_f1", "eval_precision", "eval_recall"}


@pytest.mark.e2e
def test_neo_sst2_recipe_run_end_to_end(tmp_path, models_dir, classification_data, trained_teacher):
    teacher_dir, _ = trained_teacher
    flags = classify_flags(models_dir, classification_data, tmp_path / "neo", "neo", teacher=teacher_dir,
                           recipe="sst2", teacher_quantization="none", learning_rate="5e-3")
    summary = distill(parse_config(flags))
    metrics = summary.final_metrics
    assert {"eval_teacher_agreement", "eval_kl_to_teacher", "kd_loss"} <= set(metrics)
    lines = [json.loads(line) for line in (tmp_path / "neo" / "metrics.jsonl").read_text().splitlines()]
    assert all(entry["kd_loss"] > 0 for entry in lines if "kd_loss" in entry)
    config = load_run_config(tmp_path / "neo")
    assert config["data"]["class_names"] == "question,statement" and config["distill"]["temperature"] == 2.0
    # PEFT saves the classification head in full beside the adapter (SEQ_CLS), so the run reloads as trained
    from safetensors import safe_open
    with safe_open(str(summary.weights_dir / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert any("score" in key for key in keys) and all("q_proj" in k or "k_proj" in k or "v_proj" in k or "score" in k
                                                      for key in keys for k in [key])
    model, tokenizer = load_run_model(tmp_path / "neo")
    merged = merge_run(tmp_path / "neo", tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(merged)
    assert reloaded.config.id2label == {0: "question", 1: "statement"}
    batch = AutoTokenizer.from_pretrained(merged)(["Is it here?", "It is here."], return_tensors="pt", padding=True)
    torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.e2e
def test_accumulation_does_not_change_the_step(tmp_path, models_dir, classification_data, trained_teacher):
    teacher_dir, _ = trained_teacher
    adapters = []
    for batch, accumulation in ((8, 1), (4, 2)):
        flags = classify_flags(models_dir, classification_data, tmp_path / f"b{batch}", "neo", teacher=teacher_dir,
                               max_steps=3, gradient_accumulation_steps=accumulation, temperature=2.0,
                               per_device_train_batch_size=batch)
        adapters.append(distill(parse_config(flags)).weights_dir / "adapter_model.safetensors")
    from safetensors.torch import load_file
    first, second = (load_file(str(path)) for path in adapters)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=1e-6)


@pytest.mark.e2e
def test_teacher_without_a_trained_head_is_refused(tmp_path, models_dir, classification_data):
    flags = classify_flags(models_dir, classification_data, tmp_path / "neo", "neo")
    with pytest.raises(ConfigError, match="has no trained classification head .*score.weight.* fine-tune it first"):
        distill(parse_config(flags))


@pytest.mark.e2e
def test_teacher_with_other_classes_is_refused(tmp_path, models_dir, classification_data, trained_teacher):
    flags = classify_flags(models_dir, classification_data, tmp_path / "neo", "neo", teacher=trained_teacher[0],
                           class_names="statement,question")
    with pytest.raises(VocabularyError, match=r"classifies into \['question', 'statement'\] but the data's classes "
                                              r"are \['statement', 'question'\]"):
        distill(parse_config(flags))


@pytest.mark.e2e
def test_cli_eval_of_a_classification_run(tmp_path, models_dir, classification_data, trained_teacher, capsys):
    flags = classify_flags(models_dir, classification_data, tmp_path / "lora", "lora", max_steps=2)
    assert main(["distill", *flags]) == 0
    assert main(["eval", str(tmp_path / "lora"), "--teacher_model", trained_teacher[0]]) == 0
    result = json.loads((tmp_path / "lora" / "eval.json").read_text())["held_out"]
    assert {"accuracy", "f1", "teacher_agreement", "kl_to_teacher"} <= set(result) and result["texts"] == 48


@pytest.mark.e2e
def test_eval_of_a_classifier_directory_equals_one_text_at_a_time(tmp_path, classification_data, trained_teacher):
    """Batched, padded evaluation must score each text as it scores alone (the head reads the last real token)."""
    from llmneo.evaluation.evaluate import EvalRequest, evaluate_target
    teacher_dir = trained_teacher[0]
    scores = evaluate_target(EvalRequest(teacher_dir, dataset=classification_data["test"], batch_size=8))["held_out"]
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    rows = [json.loads(line) for line in open(classification_data["test"], encoding="utf-8")]
    with torch.no_grad():
        predictions = [model(**tokenizer(row["text"], return_tensors="pt")).logits.argmax(-1).item() for row in rows]
    references = [model.config.label2id[row["label"]] for row in rows]
    assert scores["accuracy"] == pytest.approx(accuracy_score(references, predictions))
    assert scores["f1"] == pytest.approx(f1_score(references, predictions, zero_division=0))
    assert not (tmp_path / "eval.json").exists() and not (Path(teacher_dir) / "eval.json").exists()


@pytest.mark.e2e
def test_compare_reports_classification_metrics(tmp_path, models_dir, classification_data, trained_teacher):
    flags = classify_flags(models_dir, classification_data, tmp_path / "unused", "neo", teacher=trained_teacher[0],
                           max_steps=2)
    flags = flags[: flags.index("--output_dir")] + flags[flags.index("--output_dir") + 2:]
    assert main(["compare", *flags, "--methods", "lora,neo", "--output", str(tmp_path / "cmp")]) == 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| Method | Trainable params | Peak memory (GiB) | Wall time (s) | Accuracy | F1 |" in report
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "compare.csv", encoding="utf-8")))
    assert [row["method"] for row in rows] == ["lora", "neo"]
    assert all(0.0 <= float(row["accuracy"]) <= 1.0 and row["teacher_agreement"] for row in rows)


def test_class_fidelity_kl_equals_the_kl_of_the_two_models(tokenizer):
    from llmneo.evaluation.classification import class_fidelity_kl
    from transformers import LlamaConfig, LlamaForSequenceClassification
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_labels=3, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    first, second = LlamaForSequenceClassification(config).eval(), LlamaForSequenceClassification(config).eval()
    batch = tokenizer(["a short text", "another one here"], return_tensors="pt", padding=True)
    assert class_fidelity_kl(first, first, batch) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        p, q = (torch.softmax(model(**batch).logits.double(), -1) for model in (first, second))
    expected = (p * (p.log() - q.log())).sum(-1).mean().item()
    assert class_fidelity_kl(first, second, batch) == pytest.approx(expected, abs=1e-6)  # fp32 logits
