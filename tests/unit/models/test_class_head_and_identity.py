"""models/class_head.py and models/identity.py: a classifier's classes, and what identifies a model directory and a
run's rows."""

from __future__ import annotations

from datasets import Dataset

from llmneo.demo.tiny import build_tiny_llama
from llmneo.models.class_head import ClassHead
from llmneo.models.identity import data_fingerprint, model_identity


def test_a_class_head_from_a_run_config_and_its_model_options(tokenizer):
    head = ClassHead.from_run_config({"data": {"task": "classification", "class_names": "neg,pos"}}, tokenizer)
    assert head.labels == ("neg", "pos") and head.pad_token_id == tokenizer.pad_token_id
    assert head.model_kwargs() == {"num_labels": 2, "id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1},
                                   "pad_token_id": tokenizer.pad_token_id}
    assert head.model_kwargs(set_labels=False) == {"pad_token_id": tokenizer.pad_token_id}
    assert ClassHead.from_run_config({"data": {"task": "causal_lm"}}, tokenizer) is None


def test_a_saved_causal_lm_has_no_class_head(tokenizer, tmp_path):
    build_tiny_llama(tokenizer, hidden_size=32).save_pretrained(tmp_path)
    assert ClassHead.from_saved_model(tmp_path, tokenizer) is None


def test_a_model_saved_twice_is_one_identity_and_retrained_weights_another(tokenizer, tmp_path):
    model = build_tiny_llama(tokenizer, hidden_size=32, seed=1)
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "copy")
    build_tiny_llama(tokenizer, hidden_size=32, seed=2).save_pretrained(tmp_path / "b")
    identity = model_identity(str(tmp_path / "a"), sample_weights=True)
    assert identity["path"] == str((tmp_path / "a").resolve())
    assert identity["sha256"] == model_identity(str(tmp_path / "copy"), sample_weights=True)["sha256"]
    assert identity["sha256"] != model_identity(str(tmp_path / "b"), sample_weights=True)["sha256"]


def test_the_data_fingerprint_counts_answer_tokens_and_sees_any_change():
    rows = {"input_ids": [[1, 2, 3], [4, 5]], "labels": [[-100, 2, 3], [-100, 5]]}
    fingerprint = data_fingerprint(Dataset.from_dict(rows), "train.jsonl")
    assert (fingerprint["rows"], fingerprint["answer_tokens"], fingerprint["dataset"]) == (2, 3, "train.jsonl")
    changed = data_fingerprint(Dataset.from_dict({**rows, "labels": [[-100, -100, 3], [-100, 5]]}), "train.jsonl")
    assert changed["sha256"] != fingerprint["sha256"] and changed["answer_tokens"] == 2


def test_sampled_blocks_are_spread_over_a_large_file(tmp_path):
    """A weight file much larger than the sampled blocks (8 × 64 KiB): a change in its last block only, and one
    inner tensor rewritten in place while the first tensor stays, each give another identity; the file's size and
    header stay the same in both."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from llmneo.models.identity import model_identity

    tensors = {"a_first": torch.zeros(1024), "b_inner": torch.zeros(512, 1024), "c_last": torch.zeros(64 * 1024)}
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file(tensors, folder / "model.safetensors")
    assert (folder / "model.safetensors").stat().st_size > 2 * 2**20
    original = model_identity(str(folder), sample_weights=True)

    last = tmp_path / "last"
    shutil.copytree(folder, last)
    with open(last / "model.safetensors", "r+b") as handle:
        handle.seek(-8, 2)
        handle.write(b"\x01" * 8)
    inner = tmp_path / "inner"
    shutil.copytree(folder, inner)
    save_file({**tensors, "b_inner": torch.full((512, 1024), 0.5)}, inner / "model.safetensors")
    for changed in (last, inner):
        assert (changed / "model.safetensors").stat().st_size == (folder / "model.safetensors").stat().st_size
        current = model_identity(str(changed), sample_weights=True)
        assert current["sha256"] != original["sha256"], changed.name
        assert model_identity(str(changed))["sha256"] == model_identity(str(folder))["sha256"]  # header and size alike
