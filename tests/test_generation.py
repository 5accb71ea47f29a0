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
    merged = tmp_path / "merged"
    assert cli.main(["merge", str(run), "--output", str(merged)]) == 0
    assert cli.main(["generate", str(run), "--prompt", PROMPTS[0], "--max_new_tokens", "6"]) == 0
    assert f"### answer\n{by_hand(str(merged), PROMPTS[0], 6)}\n" in capsys.readouterr().out


def test_generate_needs_exactly_one_prompt_source(models_dir, capsys):
    assert cli.main(["generate", models_dir["teacher"]]) == 1
    assert "give exactly one of --prompt TEXT and --prompts FILE" in capsys.readouterr().err
