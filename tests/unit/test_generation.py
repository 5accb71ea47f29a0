"""generation.py: what `llm-neo generate` reads, and the paths it refuses in one line."""

from __future__ import annotations

import pytest
import yaml

from llmneo.demo.tiny import build_tiny_llama
from llmneo.errors import ConfigError
from llmneo.evaluation.answers import prompt_ids
from llmneo.generation import answer_budget, answer_prompts, load_for_generation


def test_a_model_directory_generates_and_its_teacher_is_refused(tokenizer, tmp_path):
    build_tiny_llama(tokenizer, hidden_size=32, seed=7).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded = load_for_generation(str(tmp_path))
    (answer,) = answer_prompts(model, loaded, ["hello"], max_new_tokens=3)
    assert isinstance(answer, str) and not model.training
    with pytest.raises(ConfigError, match=r"--teacher needs a run directory"):
        load_for_generation(str(tmp_path), teacher=True)


def test_a_classifier_run_and_a_run_without_teacher_are_refused(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"task": "classification"}, "model": {}}))
    with pytest.raises(ConfigError, match=r"holds a classifier: generate is for causal language models"):
        load_for_generation(str(tmp_path))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"task": "causal_lm"}, "model": {}}))
    with pytest.raises(ConfigError, match=r"has no teacher_model"):
        load_for_generation(str(tmp_path), teacher=True)


def test_a_runs_teacher_answers_through_its_own_chat_template(tokenizer, tmp_path):
    """--teacher (the run's one teacher) and --teacher NAME (one of --teachers) load that teacher with the chat
    template it read training rows with; a served member, or a name the run lacks, is refused by name."""
    teacher = tmp_path / "teacher"
    build_tiny_llama(tokenizer, hidden_size=32, seed=7).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    template = tmp_path / "teacher.jinja"
    template.write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    run, several = tmp_path / "run", tmp_path / "several"
    run.mkdir(), several.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"teacher_model": str(teacher),
                                                               "teacher_chat_template": str(template)}}))
    members = [{"name": "local", "model": str(teacher), "chat_template": str(template)},
               {"name": "served", "server": "http://127.0.0.1:9/v1"}]
    (several / "config.yaml").write_text(yaml.safe_dump({"model": {}, "distill": {"teachers": members}}))
    for target, name in ((run, True), (several, "local")):
        model, loaded = load_for_generation(str(target), teacher=name)
        assert loaded.chat_template == template.read_text() and model.config.hidden_size == 32
    with pytest.raises(ConfigError, match=r"generate --teacher served: that teacher is served or cached"):
        load_for_generation(str(several), teacher="served")
    with pytest.raises(ConfigError, match=r"generate --teacher local: the run in .* gives no --teachers"):
        load_for_generation(str(run), teacher="local")


@pytest.mark.parametrize(("prompt_tokens", "asked", "budget"), [(10, 20, 20), (10, 246, 246), (10, 250, 246)])
def test_an_answer_is_capped_at_the_models_positions(prompt_tokens, asked, budget, capsys):
    assert answer_budget(prompt_tokens, asked, 256, 1) == budget
    assert ("answer capped at 246 tokens" in capsys.readouterr().err) == (budget < asked)


def test_answers_that_cannot_fit_are_refused():
    with pytest.raises(ConfigError, match=r"--max_new_tokens 256: the model reads at most 256 positions"):
        answer_budget(3, 256, 256, 1)
    with pytest.raises(ConfigError, match=r"prompt 2 is 256 tokens with its chat template: .* no answer fits"):
        answer_budget(256, 4, 256, 2)
    assert answer_budget(10**6, 10**6, None, 1) == 10**6  # a model that states no limit


def test_a_capped_answer_stops_at_the_last_position(tokenizer, tmp_path):
    model = build_tiny_llama(tokenizer, hidden_size=32, seed=7)
    prompt = prompt_ids(tokenizer, "hello").shape[1]
    model.config.max_position_embeddings = prompt + 20
    generated = []
    original = model.generate
    model.generate = lambda ids, **kwargs: generated.append(kwargs["max_new_tokens"]) or original(ids, **kwargs)
    answer_prompts(model.eval(), tokenizer, ["hello"], max_new_tokens=19)
    assert generated == [19]
    answer_prompts(model.eval(), tokenizer, ["hello"], max_new_tokens=19 + prompt)
    assert generated == [19, 20]


def always_answers(model, token_id: int):
    """The model with an output head that always puts ``token_id`` first (greedy picks it at every step), and the
    list each generate() call's new tokens are recorded in."""
    import torch

    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[token_id] = 10.0
    model.lm_head = head
    generated, generate = [], model.generate

    def recording(input_ids, **kwargs):
        output = generate(input_ids, **kwargs)
        generated.append(output[0, input_ids.shape[1]:].tolist())
        return output

    model.generate = recording
    return model, generated


@pytest.mark.parametrize("stop", ["end of turn", "generation config"])
def test_an_answer_stops_at_the_end_of_turn_and_the_generation_configs_stops(tokenizer, stop):
    """The demo's template ends a turn with <|im_end|>, not EOS: generation must stop there (it printed the answer,
    the next turn's header and the answer again), and at the stop ids of the model's own generation config."""
    model = build_tiny_llama(tokenizer, seed=3).eval()
    token = (tokenizer.convert_tokens_to_ids("<|im_end|>") if stop == "end of turn"
             else next(i for i in range(len(tokenizer) - 1, 0, -1) if i not in tokenizer.all_special_ids))
    assert token not in (tokenizer.eos_token_id, tokenizer.unk_token_id)
    if stop == "generation config":
        model.generation_config.eos_token_id = [token]
    model, generated = always_answers(model, token)
    answer_prompts(model, tokenizer, ["hello"], max_new_tokens=6)
    assert generated == [[token]]
