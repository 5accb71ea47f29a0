"""generation.py: what `llm-neo generate` reads, and the paths it refuses in one line."""

from __future__ import annotations

import pytest
import yaml

from llmneo.demo.tiny import build_tiny_llama
from llmneo.errors import ConfigError
from llmneo.generation import answer_prompts, load_for_generation


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
