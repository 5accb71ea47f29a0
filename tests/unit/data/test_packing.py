"""Padding-free packing is exact: per-sample losses of a packed row equal the unpacked rows', for SDPA and eager
attention, with the mask transformers derives from the positions and with the one built here for models that do
not derive it, and a packed training run logs what the padded run logs."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import run_flags
from llmneo.config import parse_config
from llmneo.data.loading import build_datasets
from llmneo.data import packing as packing_module
from llmneo.data.packing import PackingCollator, packed_model_inputs
from llmneo.demo.tiny import build_tiny_llama
from llmneo.data.collators import make_collator
from llmneo.models.loading import load_student_tokenizer
from llmneo.pipeline import distill


def per_sample_losses(logits, labels, rows):
    """Summed CE over each sample's answer positions; ``rows[t]`` is the sample of position t."""
    targets = labels[:, 1:].reshape(-1)
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, reduction="none",
                             ignore_index=-100)
    return torch.zeros(int(rows.max()) + 1).index_add_(0, rows, losses)


@pytest.mark.parametrize("mask", ["derived by transformers", "built here"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_losses_equal_unpacked(models_dir, train_file, tmp_path, tokenizer, attention, mask, monkeypatch):
    config = parse_config(run_flags(models_dir, train_file, tmp_path))
    tokenizer = load_student_tokenizer(config.model)
    dataset = build_datasets(config.data, tokenizer, 0)[0].select(range(5))
    model = build_tiny_llama(tokenizer, seed=41).eval()
    model.config._attn_implementation = attention
    features = [dataset[i] for i in range(5)]
    with torch.no_grad():
        padded = make_collator(tokenizer)(features)
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        rows = torch.arange(5)[:, None].expand(-1, logits.shape[1] - 1).reshape(-1)
        expected = per_sample_losses(logits, padded["labels"], rows)
        packed = PackingCollator(attention)(features)
        assert packed["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in features))
        assert packing_module.derives_packed_attention(model)  # a transformers 5 Llama builds its masks itself
        if mask == "built here":
            monkeypatch.setattr(packing_module, "derives_packed_attention", lambda model: False)
        inputs = packed_model_inputs(packed, model)
        assert ("attention_mask" in inputs) == (mask == "built here")
        logits = model(**inputs, use_cache=False).logits
        rows = (torch.cumsum(packed["position_ids"][0] == 0, 0) - 1)[:-1]
        got = per_sample_losses(logits, packed["labels"], rows)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (expected > 0).all()


@pytest.mark.e2e
def test_packed_training_logs_what_padded_training_logs(models_dir, train_file, tmp_path):
    logs = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        distill(parse_config(run_flags(models_dir, train_file, out, packing=packing, optim="sgd")))
        logs[packing] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for packed, padded in zip(logs[True], logs[False], strict=True):
        for key in ("loss", "ce_loss", "kd_loss", "grad_norm"):
            if key in padded:
                assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-6), key
