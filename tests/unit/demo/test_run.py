"""demo/run.py: the before/after table the demo (and CI) prints."""

from __future__ import annotations

from pathlib import Path

from llmneo.demo.run import print_outputs, print_table


def test_the_table_has_one_line_per_model_with_each_metric(capsys):
    metrics = {"perplexity": 12.3456, "top1_agreement": 0.5, "kl_to_teacher": 0.25, "answer_tokens": 100}
    print_table({"teacher": metrics, "student before": metrics, "student after": metrics}, 3.2)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines if line.startswith("student")] == ["student", "student"]
    after = next(line for line in lines if line.startswith("student after"))
    assert after.split()[2:] == ["12.346", "50.0%", "0.2500"]
    assert lines[-1] == "[demo] done in 3 s; held-out answer tokens: 100"


def test_the_demo_ends_with_where_its_models_are(capsys):
    print_outputs(Path("runs/demo/teacher-run/model"), Path("runs/demo/student"), Path("runs/demo/neo-run"))
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[demo] teacher: runs/demo/teacher-run/model", "[demo] student before distillation: runs/demo/student",
                     "[demo] distilled run (adapter, metrics, report.md): runs/demo/neo-run",
                     '[demo] try: llm-neo generate runs/demo/neo-run --prompt "What is the capital of France?"']
