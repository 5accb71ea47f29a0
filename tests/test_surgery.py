"""`llm-neo prune-layers`: the kept layers are the named ones, bit-identical, and the student loads and runs."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import save_model
from llmneo import cli
from llmneo.demo.tiny import build_tiny_llama
from llmneo.errors import ConfigError
from llmneo.surgery import layers_to_keep


@pytest.fixture
def four_layers(tokenizer, tmp_path):
    return save_model(tmp_path / "source", build_tiny_llama(tokenizer, num_layers=4, seed=51), tokenizer)


@pytest.mark.parametrize("option, kept", [(["--keep", "2"], [0, 3]), (["--drop", "1,2"], [0, 3]),
                                          (["--keep", "3"], [0, 2, 3]), (["--drop", "0"], [1, 2, 3])])
def test_kept_layers_are_bit_identical_and_the_student_runs(four_layers, tmp_path, tokenizer, option, kept, capsys):
    out = tmp_path / "student"
    assert cli.main(["prune-layers", four_layers, *option, "--output", str(out)]) == 0
    assert f"kept layers {kept}" in capsys.readouterr().out
    source, pruned = load_file(f"{four_layers}/model.safetensors"), load_file(out / "model.safetensors")
    expected = {}
    for key, value in source.items():
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers."):].split(".", 1)
            if int(index) in kept:
                expected[f"model.layers.{kept.index(int(index))}.{rest}"] = value
        else:
            expected[key] = value
    assert pruned.keys() == expected.keys()
    assert all(torch.equal(pruned[key], value) for key, value in expected.items())
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == len(kept)
    ids = torch.tensor([tokenizer.encode("What colour is the sky?")])
    assert torch.isfinite(student(input_ids=ids).logits).all()
    assert (out / "tokenizer.json").is_file()


def test_layer_choices_are_checked():
    assert layers_to_keep(30, keep=10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    with pytest.raises(ConfigError, match="exactly one of --keep N and --drop"):
        layers_to_keep(4)
    with pytest.raises(ConfigError, match="--keep 5: the model has 4 layers"):
        layers_to_keep(4, keep=5)
    with pytest.raises(ConfigError, match="--drop 4: layers are numbered 0 to 3"):
        layers_to_keep(4, drop=[4])
    with pytest.raises(ConfigError, match="--drop removes every layer"):
        layers_to_keep(2, drop=[0, 1])
