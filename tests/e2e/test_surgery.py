"""`llm-neo prune-layers`: the kept layers are the named ones, bit-identical, and the student loads and runs."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import save_model
from tiny_gguf import write_gguf
from llmneo import cli
from llmneo.demo.tiny import build_tiny_llama
from llmneo.errors import ConfigError
from llmneo.pruning import layers_to_keep


@pytest.fixture
def four_layers(tokenizer, tmp_path):
    return save_model(tmp_path / "source", build_tiny_llama(tokenizer, num_layers=4, seed=51), tokenizer)


@pytest.mark.e2e
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




@pytest.mark.e2e
def test_import_gguf_round_trip(tokenizer, tmp_path, capsys):
    import gguf  # noqa: F401  - in the test extra
    source = build_tiny_llama(tokenizer, num_layers=2, seed=52).eval()
    (tmp_path / "pkg").mkdir()
    write_gguf(source, tokenizer, tmp_path / "pkg" / "tiny.Q.gguf")
    assert cli.main(["import-gguf", str(tmp_path / "pkg"), "--output", str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / "model.safetensors").is_file()
    imported = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert getattr(imported.config, "quantization_config", None) is None
    from transformers import AutoTokenizer

    imported_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    text = "What colour is the sky? The sky is blue."
    assert imported_tokenizer.encode(text) == tokenizer.encode(text)
    assert imported_tokenizer.chat_template == tokenizer.chat_template
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(imported(input_ids=ids).logits, source(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_import_gguf_names_what_it_cannot_use(tmp_path):
    import gguf  # noqa: F401  - in the test extra
    from llmneo.gguf import find_gguf

    with pytest.raises(ConfigError, match="is neither a .gguf file, a folder, nor an installed package"):
        find_gguf("no-such-package-xyz")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"must hold exactly one .gguf file \(found: a.gguf, b.gguf\)"):
        find_gguf(str(tmp_path))


@pytest.fixture
def identity_layer_model(tokenizer, tmp_path):
    """A 4-layer model whose layer 2 is an exact identity (its attention and MLP output projections are zero)."""
    model = build_tiny_llama(tokenizer, num_layers=4, seed=52)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    return save_model(tmp_path / "identity-source", model, tokenizer)


@pytest.mark.parametrize("strategy", ["block-influence", "greedy"])
def test_calibrated_strategies_remove_the_identity_layer_first(identity_layer_model, train_file, tmp_path, strategy,
                                                               capsys):
    import json

    out = tmp_path / strategy
    assert cli.main(["prune-layers", identity_layer_model, "--keep", "2", "--strategy", strategy, "--calibration",
                     train_file, "--calibration_rows", "16", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "pruning.json").read_text())
    assert record["strategy"] == strategy and record["removed"][0] == 2 and len(record["kept"]) == 2
    assert 2 not in record["kept"] and record["kept"] == sorted(record["kept"])
    assert set(record["scores"]) == {"0", "1", "2", "3"}
    assert min(record["scores"], key=record["scores"].get) == "2"
    assert record["scores"]["2"] == pytest.approx(0.0, abs=1e-5)
    assert [step["layers"] for step in record["steps"]] == [3, 2]
    assert record["steps"][0]["kl"] == pytest.approx(0.0, abs=1e-5)  # removing an identity changes nothing
    assert "removed layer   2: 3 layers left, calibration KL 0.0000" in printed
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


def test_greedy_is_the_default_with_calibration_and_even_without(identity_layer_model, train_file, tmp_path):
    import json

    assert cli.main(["prune-layers", identity_layer_model, "--keep", "3", "--calibration", train_file,
                     "--calibration_rows", "8", "--output", str(tmp_path / "calibrated")]) == 0
    assert json.loads((tmp_path / "calibrated" / "pruning.json").read_text())["strategy"] == "greedy"
    assert cli.main(["prune-layers", identity_layer_model, "--keep", "3", "--output", str(tmp_path / "plain")]) == 0
    record = json.loads((tmp_path / "plain" / "pruning.json").read_text())
    assert record["strategy"] == "even" and record["kept"] == [0, 2, 3]


def test_calibrated_strategies_need_data_and_keep(identity_layer_model, tmp_path, capsys):
    assert cli.main(["prune-layers", identity_layer_model, "--keep", "2", "--strategy", "greedy", "--output",
                     str(tmp_path / "x")]) == 1
    assert "--strategy greedy chooses the layers from --calibration data with --keep N" in capsys.readouterr().err
