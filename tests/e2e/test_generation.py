"""`llm-neo generate`: greedy answers through the chat template, equal to a hand-run `model.generate`."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_flags
from llmneo import cli
from llmneo.config import parse_config
from llmneo.pipeline import distill

PROMPTS = ["What colour is the sky?", "Name a fruit."]


def by_hand(model_dir: str, prompt: str, max_new_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_equals_a_hand_run_generate(models_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    assert cli.main(["generate", models_dir["teacher"], "--prompts", str(prompts), "--max_new_tokens", "12"]) == 0
    printed = capsys.readouterr().out
    for prompt in PROMPTS:
        expected = by_hand(models_dir["teacher"], prompt, 12)
        assert f"### prompt\n{prompt}\n### answer\n{expected}\n" in printed
    assert printed.count("### prompt") == 2


@pytest.mark.e2e
def test_generate_with_a_run_and_its_teacher(models_dir, train_file, tmp_path, capsys):
    run = tmp_path / "run"
    distill(parse_config(run_flags(models_dir, train_file, run)))
    assert cli.main(["generate", str(run), "--prompt", PROMPTS[0], "--max_new_tokens", "6", "--teacher"]) == 0
    assert f"### answer\n{by_hand(models_dir['teacher'], PROMPTS[0], 6)}\n" in capsys.readouterr().out
    assert cli.main(["generate", "--teacher", str(run), "--prompt", PROMPTS[0], "--max_new_tokens", "6"]) == 0
    assert f"### answer\n{by_hand(models_dir['teacher'], PROMPTS[0], 6)}\n" in capsys.readouterr().out  # flag first
    merged = tmp_path / "merged"
    assert cli.main(["merge", str(run), "--output", str(merged)]) == 0
    assert cli.main(["generate", str(run), "--prompt", PROMPTS[0], "--max_new_tokens", "6"]) == 0
    assert f"### answer\n{by_hand(str(merged), PROMPTS[0], 6)}\n" in capsys.readouterr().out


def test_generate_needs_exactly_one_prompt_source(models_dir, capsys):
    assert cli.main(["generate", models_dir["teacher"]]) == 1
    assert "give exactly one of --prompt TEXT and --prompts FILE" in capsys.readouterr().err


@pytest.mark.e2e
def test_every_run_with_held_out_rows_reports_before_and_after(models_dir, train_file, tmp_path, capsys):
    import json

    run = tmp_path / "run"
    summary = distill(parse_config(run_flags(models_dir, train_file, run, eval_ratio=0.25)))
    printed = capsys.readouterr().out
    before = json.loads((run / "before.json").read_text())
    after = {key.removeprefix("eval_"): value for key, value in summary.final_metrics.items()
             if key.startswith("eval_")}
    assert set(before["metrics"]) >= {"perplexity", "top1_agreement", "kl_to_teacher"}
    assert before["metrics"]["kl_to_teacher"] != after["kl_to_teacher"]
    assert f"{'held-out':<18}{'before training':>18}{'after training':>18}" in printed
    for name in ("perplexity", "top1_agreement", "kl_to_teacher"):
        assert f"{name:<18}" in printed
        assert f"| {name} | {before['metrics'][name]:.4g} | {after[name]:.4g} |" in (run / "README.md").read_text()
    report = (run / "report.md").read_text()
    assert "## Held-out metrics before and after training" in report
    assert "## Answers to held-out prompts (greedy)" in report and report.count("### Prompt ") == 3
    assert report.count("**teacher:**") == report.count("**student before:**") == report.count("**student after:**") == 3
    assert len(before["samples"]["teacher"]) == 3


@pytest.mark.e2e
def test_eval_measures_like_for_like_with_max_length_and_max_samples(models_dir, train_file, tmp_path):
    from llmneo.config import DataArguments
    from llmneo.data.loading import build_datasets
    from llmneo.evaluation.evaluate import EvalRequest, evaluate_target
    from llmneo.losses.contract import count_answer_tokens
    from llmneo.models.loading import load_student_tokenizer

    run = tmp_path / "run"
    config = parse_config(run_flags(models_dir, train_file, run, eval_ratio=0.25))
    distill(config)
    whole = evaluate_target(EvalRequest(target=str(run)), write=False)["held_out"]
    cut = evaluate_target(EvalRequest(target=str(run), max_samples=3, max_length=48), write=False)["held_out"]
    tokenizer = load_student_tokenizer(config.model)
    data = DataArguments(**{**config.data.__dict__, "max_length": 48})
    rows = build_datasets(data, tokenizer, config.training.seed)[1].select(range(3))
    assert cut["answer_tokens"] == sum(count_answer_tokens(labels) for labels in rows["labels"])
    assert cut["answer_tokens"] < whole["answer_tokens"]


@pytest.mark.e2e
def test_eval_skips_held_out_rows_without_answer_tokens_only_when_asked(models_dir, tmp_path, capsys):
    import json

    from conftest import write_jsonl
    from llmneo.demo.tiny import corpus_rows

    long_prompt = {"conversations": [{"from": "human", "value": "tell me more " * 40},
                                     {"from": "gpt", "value": "No."}]}
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [*corpus_rows()[:3], long_prompt])
    flags = ["eval", models_dir["student"], "--dataset", held_out, "--max_length", "64", "--bootstrap", "0"]
    assert cli.main(flags) == 1
    error = capsys.readouterr().err
    assert "row 4, field 'conversations': no answer tokens left" in error, [line for line in error.splitlines() if "no answer" in line]
    assert cli.main([*flags, "--skip_bad_rows"]) == 0
    printed = capsys.readouterr().out
    kept = json.loads(printed[printed.index("{\n"):])["held_out"]
    assert cli.main(["eval", models_dir["student"], "--dataset", write_jsonl(tmp_path / "three.jsonl", corpus_rows()[:3]),
                     "--max_length", "64", "--bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    assert kept == json.loads(printed[printed.index("{\n"):])["held_out"]
