"""pruning.prune_layers: the pruned copy equals a model built from the kept layers' weights, generates with a KV
cache, and leaves the original untouched."""

from __future__ import annotations

import torch

from llmneo.demo.tiny import build_tiny_llama
from llmneo.pruning import prune_layers


def test_the_pruned_copy_is_the_kept_layers_and_generates(tokenizer):
    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=4, seed=5).eval()
    original = {name: value.clone() for name, value in model.state_dict().items()}
    pruned = prune_layers(model, [0, 3]).eval()
    reference = type(model)(type(model.config).from_dict({**model.config.to_dict(), "num_hidden_layers": 2})).eval()
    renamed = {name.replace("layers.3.", "layers.1."): value for name, value in original.items()
               if not name.startswith(("model.layers.1.", "model.layers.2."))}
    reference.load_state_dict(renamed, strict=True)
    ids = torch.tensor([tokenizer.encode("hello there, how are you")])
    torch.testing.assert_close(pruned(ids).logits, reference(ids).logits)
    assert pruned.config.num_hidden_layers == 2 and model.config.num_hidden_layers == 4
    assert all(torch.equal(value, original[name]) for name, value in model.state_dict().items())
    generated = pruned.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    expected = reference.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    assert torch.equal(generated, expected)
