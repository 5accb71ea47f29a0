"""Adapters on disk: saving and loading every adapter kind, and the plain-LoRA export of MoSLoRA.

An adapter directory is PEFT's (``adapter_config.json`` + ``adapter_model.safetensors``) plus ``llmneo_adapter.json``
naming its kind, so that llm-neo rebuilds MoSLoRA layers on load. Adapters whose initialisation mutates the base
weights (PiSSA, OLoRA) are saved converted by PEFT into a plain LoRA of rank 2r that applies to the original base.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file

from ..errors import ConfigError
from ..runtime.checksums import CHECKSUM_FILE, verify_checksums
from ..runtime.model_dir import model_directory
from .lora import is_base_mutating, mutates_base, peft_wrapping
from .moslora import fold_mixers, register_moslora
from ..runtime.layout import INITIAL_ADAPTER_DIR

logger = logging.getLogger(__name__)

KIND_FILE = "llmneo_adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def save_initial_adapter(model, run_dir: Path) -> Path | None:
    """Before training: keep the freshly initialised PiSSA/OLoRA adapter, which the final save converts against."""
    config = model.peft_config["default"]
    if not mutates_base(config):
        return None
    init, config.init_lora_weights = config.init_lora_weights, True  # reloading it must not re-run the init
    target = run_dir / INITIAL_ADAPTER_DIR
    model.save_pretrained(target)
    config.init_lora_weights = init
    return target


def saved_lora_config(adapter_dir: Path) -> dict:
    """The saved adapter's adapter_config.json ({} when there is none): what it is, whatever name it was chosen by."""
    path = Path(adapter_dir) / CONFIG_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def base_mutating_init(adapter_dir: Path) -> str | None:
    """The saved adapter's initialisation when it moved part of the base into the adapter (PiSSA, OLoRA, CorDA,
    whether chosen with --adapter or through --peft_options)."""
    init = saved_lora_config(adapter_dir).get("init_lora_weights")
    return init if is_base_mutating(init) else None


def kind_record(adapter_args, base: dict | None = None) -> dict:
    """What ``llmneo_adapter.json`` says: the adapter kind (to rebuild MoSLoRA layers) and the identity of the base
    weights it was trained on (to refuse merging it into another base)."""
    return {"adapter": adapter_args.adapter, "mixer_init": adapter_args.mixer_init, "base": base}


def save_adapter(model, target: Path, adapter_args, initial_dir: Path | None = None, base: dict | None = None,
                 state_dict: dict | None = None) -> Path:
    """``state_dict``: the model's gathered weights when they are sharded (PEFT keeps the adapter's from it)."""
    kind = kind_record(adapter_args, base)
    if initial_dir is not None:
        model.save_pretrained(target, state_dict=state_dict, path_initial_model_for_weight_conversion=str(initial_dir))
        kind = {"adapter": "lora", "converted_from": adapter_args.adapter, "base": base}
    else:
        model.save_pretrained(target, state_dict=state_dict)
    (Path(target) / KIND_FILE).write_text(json.dumps(kind, indent=2) + "\n", encoding="utf-8")
    return Path(target)


def write_serving_adapter(model, target: Path, initial_dir: Path | None = None) -> int:
    """The model's current adapter as a plain PEFT LoRA that a LoRA server (vLLM) loads onto the original base:
    MoSLoRA's mixers folded, PiSSA/OLoRA converted against their untrained adapter ``initial_dir`` (rank 2r),
    written whole before it is named ``target``. Returns the weights' size in bytes."""
    with model_directory(target, "--rollout_adapter_dir") as partial:
        if initial_dir is not None:
            model.save_pretrained(partial, path_initial_model_for_weight_conversion=str(initial_dir))
        else:
            model.save_pretrained(partial)
        weights = partial / WEIGHTS_FILE
        saved = load_file(weights)
        folded = fold_mixers(saved)
        if len(folded) != len(saved):  # MoSLoRA: written again without its mixers (a plain LoRA is left as saved)
            save_file(folded, weights, metadata={"format": "pt"})
    return (Path(target) / WEIGHTS_FILE).stat().st_size


def adapter_kind(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / KIND_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"adapter": "lora"}


def load_adapter(base, adapter_dir: Path, is_trainable: bool = False):
    """``base`` with the adapter saved in ``adapter_dir``, whatever its kind."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{adapter_dir} is not an adapter directory: {CONFIG_FILE} is missing")
    verify_checksums(adapter_dir, "adapter")
    kind = adapter_kind(adapter_dir)
    config = None
    if kind["adapter"] == "moslora":
        config = register_moslora(LoraConfig.from_pretrained(adapter_dir), kind.get("mixer_init", "kaiming"))
    with peft_wrapping():
        return PeftModel.from_pretrained(base, adapter_dir, config=config, is_trainable=is_trainable)


def export_plain_lora(adapter_dir: Path, output: Path) -> Path:
    """Write ``adapter_dir`` as a standard PEFT LoRA that stock PEFT, vLLM and other LoRA loaders read."""
    adapter_dir, output = Path(adapter_dir), Path(output)
    kind = adapter_kind(adapter_dir)["adapter"]
    if saved_lora_config(adapter_dir).get("use_dora"):  # --adapter dora or --peft_options '{"use_dora": true}'
        raise ConfigError("a DoRA adapter has no plain-LoRA form (its magnitude vector rescales W0): "
                          "use `llm-neo merge` for a standalone model")
    if not (adapter_dir / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{adapter_dir} holds no {WEIGHTS_FILE}")
    if output.resolve() == adapter_dir.resolve():
        raise ConfigError("export-lora writes a new directory: --output must differ from the adapter directory")
    verify_checksums(adapter_dir, "adapter")
    with model_directory(output) as partial:
        for item in adapter_dir.iterdir():
            if item.is_file() and item.name not in (WEIGHTS_FILE, KIND_FILE, CHECKSUM_FILE):
                shutil.copy2(item, partial / item.name)
        save_file(fold_mixers(load_file(adapter_dir / WEIGHTS_FILE)), partial / WEIGHTS_FILE, metadata={"format": "pt"})
    logger.debug("plain LoRA form of the %s adapter written to %s", kind, output)
    return output
