"""Evaluation (offline metrics, the lm-eval bridge, `llm-neo eval`) and the experiment commands (compare, sweep,
scaling) end to end on tiny models, checking the numbers behind every table and figure."""

import csv
import json
import math

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F

from conftest import run_flags, write_jsonl
from llmneo import cli
from llmneo.data.loading import build_datasets
from llmneo.config import parse_config
from llmneo.demo.tiny import build_tiny_llama
from llmneo.evaluation.harness import TASK_PRESETS, HarnessTasks, resolve_tasks, run_lm_eval
from llmneo.evaluation.metrics import HeldOutOptions, evaluate_against_teacher
from llmneo.experiments import cells as cells_module
from llmneo.experiments.sweep import sweep
from llmneo.data.collators import make_collator
from llmneo.models.loading import load_student_tokenizer
from llmneo.pipeline import distill
from llmneo.report import bar_chart
from llmneo.runtime.layout import read_metrics


def naive_metrics(student, teacher, dataset):
    """Loop over every answer position: -log p_student(label), argmax agreement, KL(teacher || student)."""
    nll, agree, kl, count = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for row in dataset:
            ids = torch.tensor([row["input_ids"]])
            s_logits, t_logits = student(input_ids=ids).logits[0], teacher(input_ids=ids).logits[0]
            for t, label in enumerate(row["labels"][1:]):
                if label == -100:
                    continue
                log_s, log_t = F.log_softmax(s_logits[t], -1), F.log_softmax(t_logits[t], -1)
                nll -= log_s[label].item()
                agree += int(s_logits[t].argmax() == t_logits[t].argmax())
                kl += (log_t.exp() * (log_t - log_s)).sum().item()
                count += 1
    return {"perplexity": math.exp(nll / count), "top1_agreement": agree / count, "kl_to_teacher": kl / count,
            "answer_tokens": count}


def held_out(models_dir, train_file, tmp_path):
    config = parse_config(run_flags(models_dir, train_file, tmp_path, eval_ratio=0.25))
    tokenizer = load_student_tokenizer(config.model)
    train, rows, _ = build_datasets(config.data, tokenizer, config.training.seed)
    assert len(rows) == 12 and len(train) == 36 and not set(map(tuple, rows["input_ids"])) & set(
        map(tuple, train["input_ids"]))
    return rows, tokenizer


def test_offline_metrics_equal_a_naive_loop(models_dir, train_file, tmp_path, tokenizer):
    rows, tokenizer = held_out(models_dir, train_file, tmp_path)
    student, teacher = build_tiny_llama(tokenizer, seed=21).eval(), build_tiny_llama(tokenizer, seed=22).eval()
    ours = evaluate_against_teacher(student, rows, make_collator(tokenizer), teacher,
                                    HeldOutOptions(batch_size=5, chunk_size=7))
    reference = naive_metrics(student, teacher, rows)
    assert ours["answer_tokens"] == reference["answer_tokens"]
    for key in ("perplexity", "top1_agreement", "kl_to_teacher"):
        assert ours[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-7), key
    itself = evaluate_against_teacher(teacher, rows, make_collator(tokenizer), teacher=teacher)
    assert itself["top1_agreement"] == 1.0 and itself["kl_to_teacher"] == pytest.approx(0.0, abs=1e-7)


DOCS = [
    {"question": "What colour is the sky?", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "Add one and two.", "choices": ["three", "four", "five"], "answer": 0},
    {"question": "Name a fruit.", "choices": ["a stone", "an apple", "a chair"], "answer": 1},
    {"question": "What do cats say?", "choices": ["woof", "moo", "meow"], "answer": 2},
    {"question": "Which is cold?", "choices": ["ice", "fire"], "answer": 0},
]


def write_task(tmp_path):
    data = write_jsonl(tmp_path / "mc.jsonl", DOCS)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "neo_tiny_mc.yaml").write_text(
        "task: neo_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n", encoding="utf-8")
    return str(tmp_path / "tasks")


def hand_accuracy(model, tokenizer):
    """Choose the choice with the highest summed log-probability of ' ' + choice after the question."""
    correct = 0
    with torch.no_grad():
        for doc in DOCS:
            context = tokenizer.encode(doc["question"])
            scores = []
            for choice in doc["choices"]:
                whole = tokenizer.encode(doc["question"] + " " + choice)
                continuation = whole[len(context):]
                log_probs = F.log_softmax(model(input_ids=torch.tensor([whole[:-1]])).logits[0].float(), -1)
                positions = range(len(context) - 1, len(whole) - 1)
                scores.append(sum(log_probs[p, token].item() for p, token in zip(positions, continuation, strict=True)))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return correct / len(DOCS)


@pytest.mark.e2e
@pytest.mark.parametrize("seed", [31, 32])
def test_lm_eval_bridge_equals_a_hand_computation(tmp_path, tokenizer, seed):
    import lm_eval  # noqa: F401  - the eval extra, installed by the README's install command
    model = build_tiny_llama(tokenizer, seed=seed).eval()
    results = run_lm_eval(model, tokenizer, HarnessTasks("neo_tiny_mc", include_path=write_task(tmp_path), batch_size=2))
    assert results["neo_tiny_mc"]["acc"] == pytest.approx(hand_accuracy(model, tokenizer))


@pytest.mark.e2e
def test_task_presets_and_unknown_tasks(tmp_path, tokenizer):
    import lm_eval  # noqa: F401  - the eval extra, installed by the README's install command
    assert resolve_tasks("llm-neo,neo_tiny_mc") == [*TASK_PRESETS["llm-neo"], "neo_tiny_mc"]
    from llmneo.errors import ConfigError

    with pytest.raises(ConfigError, match="lm-eval knows no task 'neo_tiny_mcq'"):
        run_lm_eval(build_tiny_llama(tokenizer), tokenizer, HarnessTasks("neo_tiny_mcq", include_path=write_task(tmp_path)))


@pytest.mark.e2e
def test_eval_command_on_a_run(models_dir, train_file, tmp_path, capsys):
    out = tmp_path / "run"
    summary = distill(parse_config(run_flags(models_dir, train_file, out, eval_ratio=0.25)))
    assert summary.final_metrics["eval_answer_tokens"] > 0  # evaluated at the end of training
    logged = read_metrics(out / "metrics.jsonl")
    assert any("eval_kl_to_teacher" in entry for entry in logged)
    import lm_eval  # noqa: F401  - the eval extra, installed by the README's install command
    assert cli.main(["eval", str(out), "--tasks", "neo_tiny_mc", "--include_path", write_task(tmp_path)]) == 0
    written = json.loads((out / "eval.json").read_text())
    assert written["held_out"]["kl_to_teacher"] == pytest.approx(summary.final_metrics["eval_kl_to_teacher"], rel=1e-4)
    assert 0 <= written["tasks"]["neo_tiny_mc"]["acc"] <= 1
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{\n  \"held_out\""):]) == written


@pytest.mark.e2e
def test_run_report_and_curves(models_dir, train_file, tmp_path):
    out = tmp_path / "run"
    distill(parse_config(run_flags(models_dir, train_file, out, eval_ratio=0.25, eval_strategy="steps", eval_steps=2)))
    report = (out / "report.md").read_text()
    assert "| method | neo |" in report and "eval_kl_to_teacher" in report and "training_curves.png" in report
    image = matplotlib.image.imread(out / "training_curves.png")
    assert image.ndim == 3 and image.shape[0] > 100
    evals = [entry for entry in read_metrics(out / "metrics.jsonl") if "eval_perplexity" in entry]
    assert [entry["step"] for entry in evals] == [2, 3]  # at eval_steps, and once more at the end


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.e2e
def test_compare_writes_table_csv_and_chart(models_dir, train_file, tmp_path):
    out = tmp_path / "compare"
    assert cli.main(["compare", "--output", str(out), *run_flags(models_dir, train_file, tmp_path / "base")]) == 0
    rows = read_csv(out / "compare.csv")
    assert [row["method"] for row in rows] == ["sft", "lora", "kd", "neo"]
    full, adapter = int(rows[0]["trainable_parameters"]), int(rows[1]["trainable_parameters"])
    assert full > adapter > 0 and rows[2]["trainable_parameters"] == rows[0]["trainable_parameters"]
    for row in rows:
        assert float(row["peak_memory_gib"]) > 0 and float(row["wall_time_s"]) > 0
        assert 0 <= float(row["top1_agreement"]) <= 1 and float(row["kl_to_teacher"]) > 0
    report = (out / "report.md").read_text()
    assert report.count("\n| ") == 5 and "compare.png" in report  # header + 4 methods
    assert matplotlib.image.imread(out / "compare.png").ndim == 3


def test_bar_chart_draws_one_bar_per_row(tmp_path):
    rows = [{"method": m, "a": i, "b": 2 * i} for i, m in enumerate(["sft", "lora", "kd", "neo"])]
    drawn = bar_chart(rows, "method", ["a", "b"], tmp_path / "bars.png", "t")
    assert drawn == {"a": {"sft": 0, "lora": 1, "kd": 2, "neo": 3}, "b": {"sft": 0, "lora": 2, "kd": 4, "neo": 6}}


@pytest.mark.e2e
def test_sweep_resumes_after_a_kill_and_names_the_best(models_dir, train_file, tmp_path, monkeypatch):
    argv = run_flags(models_dir, train_file, tmp_path / "base")
    trained = []
    real_distill = cells_module.distill

    def distill_until_killed(config):
        if len(trained) == 2:
            raise KeyboardInterrupt("killed during the third cell")
        trained.append(config.training.output_dir)
        return real_distill(config)

    monkeypatch.setattr(cells_module, "distill", distill_until_killed)
    with pytest.raises(KeyboardInterrupt):
        sweep(argv, [2, 4], [1e-3, 1e-2], output=str(tmp_path / "sweep"))
    assert len(trained) == 2
    monkeypatch.setattr(cells_module, "distill", lambda config: (trained.append(config.training.output_dir),
                                                                 real_distill(config))[1])
    result = sweep(argv, [2, 4], [1e-3, 1e-2], output=str(tmp_path / "sweep"))
    assert len(trained) == 4 and len(set(trained)) == 4  # the two finished cells were not trained again
    rows = read_csv(tmp_path / "sweep" / "sweep.csv")
    assert [(row["rank"], row["learning_rate"]) for row in rows] == [("2", "0.001"), ("2", "0.01"), ("4", "0.001"),
                                                                     ("4", "0.01")]
    kl = {(int(r["rank"]), float(r["learning_rate"])): float(r["kl_to_teacher"]) for r in rows}
    assert result["grid"] == [[kl[(2, 1e-3)], kl[(2, 1e-2)]], [kl[(4, 1e-3)], kl[(4, 1e-2)]]]
    best = min(kl, key=kl.get)
    assert (result["best"]["rank"], result["best"]["learning_rate"]) == best
    assert f"Best by kl_to_teacher: rank {best[0]}, lr {best[1]:g}" in (tmp_path / "sweep" / "report.md").read_text()
    assert matplotlib.image.imread(tmp_path / "sweep" / "sweep_heatmap.png").ndim == 3


@pytest.mark.e2e
def test_scaling_plots_the_metric_against_trained_tokens(models_dir, train_file, tmp_path):
    out = tmp_path / "scaling"
    flags = run_flags(models_dir, train_file, tmp_path / "base", max_steps=-1, num_train_epochs=1)
    assert cli.main(["scaling", "--samples", "32,16", "--output", str(out), *flags]) == 0
    rows = read_csv(out / "scaling.csv")
    assert [row["samples"] for row in rows] == ["16", "32"]
    tokens = [int(row["trained_answer_tokens"]) for row in rows]
    assert 0 < tokens[0] < tokens[1]
    assert matplotlib.image.imread(out / "scaling.png").ndim == 3
