"""Objects given in memory where a path is accepted: rows, and loaded models with their tokenizers.

Rows (a ``datasets.Dataset``, an ``IterableDataset``, a list of row dicts, or a dict of columns) are registered
under a name that stands in the run's options where a path would (``memory:train-<fingerprint>``), so that the run's
config.yaml says what they were, and the data loader reads them from this process's registry exactly as it reads a
file: same formats, same checks, same tokenization.

A loaded model is named by the directory it was loaded from when its weights there are still the ones it holds
(then the run's config names that directory, and ``eval``, ``merge`` and ``generate`` of the run read it), else by
``memory:<role>-<fingerprint>``. While a run trains (``models_in_memory``) the model loaders hand back the object
itself under that name, with the tokenizer given beside it.

A ``memory:`` name that is not registered in this process (a run's config read by ``llm-neo eval``) is refused in
one line that says what to give instead.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import datasets
import torch
from safetensors import safe_open

from .errors import ConfigError, DataError

PREFIX = "memory:"
_REGISTRY: dict[str, datasets.Dataset] = {}
_MODELS: dict[str, tuple] = {}  # name -> (model, tokenizer or None), while a run trains


def is_in_memory(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def register_rows(rows, role: str = "train") -> str:
    """The name under which ``rows`` are read; the same rows get the same name."""
    dataset = as_dataset(rows, role)
    name = f"{PREFIX}{role}-{rows_digest(dataset)[:16]}"
    _REGISTRY[name] = dataset
    return name


def registered_rows(name: str) -> datasets.Dataset:
    if name not in _REGISTRY:
        raise DataError(f"{name} names rows that were given in memory to another process: give the data itself "
                        "(--dataset PATH, or the rows to the Python API)")
    return _REGISTRY[name]


def as_dataset(rows, role: str) -> datasets.Dataset:
    """``rows`` as a ``datasets.Dataset`` (an ``IterableDataset`` is read through once)."""
    if isinstance(rows, datasets.Dataset):
        return rows
    if isinstance(rows, datasets.IterableDataset):
        return datasets.Dataset.from_list(list(rows))
    if isinstance(rows, dict):
        return datasets.Dataset.from_dict(rows)
    if isinstance(rows, (list, tuple)):
        bad = next((number for number, row in enumerate(rows, start=1) if not isinstance(row, dict)), None)
        if bad is not None:
            raise DataError(f"{role} rows: row {bad} is a {type(rows[bad - 1]).__name__}; expected a dict of "
                            "column: value per row")
        return datasets.Dataset.from_list(list(rows))
    raise DataError(f"{role} rows must be a datasets.Dataset, an IterableDataset, a list of row dicts or a dict of "
                    f"columns, got {type(rows).__name__}")


def rows_digest(rows: datasets.Dataset, skip: tuple[str, ...] = ("_source", "_row")) -> str:
    """A digest of the rows' content, columns in ``skip`` left out (where a row was read from is not its content;
    not datasets' own fingerprint, which differs between equal in-memory tables)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps({key: value for key, value in row.items() if key not in skip}, sort_keys=True,
                                 default=str).encode())
    return digest.hexdigest()


def model_name(model, role: str) -> str:
    """What a run records for a loaded model: the directory it was loaded from while its weights there are the ones
    it holds, else ``memory:<role>-<fingerprint>``."""
    source = getattr(model, "name_or_path", None)
    if source and Path(source).is_dir() and holds_saved_weights(model, Path(source)):
        return str(Path(source).resolve())
    return f"{PREFIX}{role}-{weights_fingerprint(model)}"


def holds_saved_weights(model, directory: Path) -> bool:
    """Whether every tensor of the directory's safetensors equals the model's, and the model holds no other weights
    (a tied tensor that is saved once counts once)."""
    files = sorted(directory.glob("*.safetensors"))
    state = model.state_dict()
    if not files:
        return False
    saved = set()
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                mine = state.get(key)
                if mine is None or not torch.equal(mine.detach().cpu(), handle.get_tensor(key).to(mine.dtype)):
                    return False
                saved.add(key)
    saved_storage = {state[key].data_ptr() for key in saved}
    return all(key in saved or value.data_ptr() in saved_storage for key, value in state.items())


def weights_fingerprint(model, samples: int = 4096) -> str:
    """A digest of every tensor's name, shape and dtype and of ``samples`` values spread over it."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        flat = value.detach().reshape(-1)
        picks = flat[torch.linspace(0, flat.numel() - 1, min(samples, flat.numel())).long()] if flat.numel() else flat
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(picks.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@contextmanager
def models_in_memory(models: dict[str, tuple]):
    """While the block runs, the model loaders hand back ``models[name] = (model, tokenizer)`` under ``name``."""
    _MODELS.update(models)
    try:
        yield
    finally:
        for name in models:
            _MODELS.pop(name, None)


def model_in_memory(name: str):
    """The model registered under ``name`` for this run, or None."""
    return _MODELS[name][0] if name in _MODELS else None


def tokenizer_in_memory(name: str):
    """The tokenizer given with the model registered under ``name``, or None."""
    return _MODELS[name][1] if name in _MODELS else None


def refuse_unregistered_model(name: str, role: str) -> None:
    """A ``memory:`` model name outside the run that registered it cannot be loaded: say what to give instead."""
    if is_in_memory(name) and name not in _MODELS:
        raise ConfigError(f"{role} model {name} was an in-memory model of the process that trained the run, saved "
                          f"nowhere: save it (save_pretrained) and give its path{_option(role)}")


def _option(role: str) -> str:
    return " (--teacher_model PATH)" if role == "teacher" else ""
