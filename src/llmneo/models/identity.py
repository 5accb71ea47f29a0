"""Identities: of a model directory (its config and weight headers, optionally sampled weight blocks) and of a run's
tokenized rows. Run identities, adapter bases and cache fingerprints are built from them."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ..in_memory import is_in_memory
from ..losses.contract import count_answer_tokens

logger = logging.getLogger(__name__)


def model_identity(path: str, config=None, sample_weights: bool = False) -> dict:
    """A model directory's identity without reading its weights: config.json, and each weight file's size and
    (for safetensors) header, which lists every tensor's name, dtype, shape and offsets. ``sample_weights`` also
    reads a few blocks of each weight file, so weights of the same shapes but other values differ too."""
    if is_in_memory(path):  # a model given in memory: its name holds its weights' fingerprint
        return {"path": path}
    local = Path(path).expanduser()
    if not local.is_dir():  # a hub id: its resolved revision
        if config is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path)
        return {"path": path, "revision": getattr(config, "_commit_hash", None)}
    digest = hashlib.sha256()
    for file in sorted(local.iterdir()):
        if file.name == "config.json":
            digest.update(file.read_bytes())
        elif file.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
            if file.suffix == ".safetensors":
                with open(file, "rb") as handle:
                    digest.update(handle.read(8 + int.from_bytes(handle.read(8), "little")))
            if sample_weights:
                _digest_samples(digest, file)
    return {"path": str(local.resolve()), "sha256": digest.hexdigest()}


def _digest_samples(digest, file: Path, block: int = 1 << 16, count: int = 8) -> None:
    """Blocks spread over the file: cheap even for many GB, and any retraining changes them."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        for index in range(count):
            handle.seek(max(0, (size - block) * index // max(count - 1, 1)))
            digest.update(handle.read(block))


def data_fingerprint(dataset, dataset_name: str) -> dict:
    """The tokenized rows themselves (ids and labels), so any change of data, format, sampling or truncation shows."""
    digest, answer_tokens = hashlib.sha256(), 0
    for row in dataset.with_format("numpy").select_columns(["input_ids", "labels"]):
        digest.update(row["input_ids"].astype("int32").tobytes())
        labels = row["labels"].astype("int32")
        digest.update(labels.tobytes())
        answer_tokens += count_answer_tokens(labels) if labels.ndim else 1  # a class id: one labelled text
    return {"dataset": dataset_name, "rows": len(dataset), "answer_tokens": answer_tokens, "sha256": digest.hexdigest()}


def student_identity(config) -> dict | None:
    """The identity of the student's base weights, or None when it cannot be read (a hub id offline)."""
    return weights_identity(config.model.student_model, "student", "merging and resuming will not check its base")


def weights_identity(path: str, role: str, consequence: str) -> dict | None:
    try:
        return model_identity(path, sample_weights=True)
    except (OSError, ValueError) as error:
        logger.warning("cannot fingerprint the %s %s (%s): %s", role, path, error, consequence)
        return None


def read_models(config, base: dict | None, teacher) -> dict:
    """The weights a resume reads again from their paths rather than from the checkpoint: an adapter's frozen base
    and an online teacher (a cached teacher is checked by its cache's manifest). Rewritten in place, they would
    mix two models into one run, so the run identity records them."""
    models = {"student": base} if base else {}
    if teacher is not None and config.model.teacher_model:
        models["teacher"] = weights_identity(config.model.teacher_model, "teacher", "resuming will not check it")
    for member in config.training.teachers or []:  # --teachers: each loaded one (a cache's model only names it)
        if member.get("model") and not member.get("cache"):
            models[f"teacher/{member['name']}"] = weights_identity(member["model"], f"teacher {member['name']}",
                                                                   "resuming will not check it")
    return models
