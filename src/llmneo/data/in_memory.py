"""Rows given as Python objects (a ``datasets.Dataset``, an ``IterableDataset``, a list of row dicts, or a dict of
columns) wherever a dataset path is accepted.

They are registered under a name that stands in the run's options where a path would (``memory:train-<fingerprint>``),
so that the run's config.yaml says what they were, and the loader (loading.py) reads them from this process's
registry exactly as it reads a file: same formats, same checks, same tokenization. A name that is not registered in
this process (a run's config read by ``llm-neo eval``) is refused in one line that says what to give instead.
"""

from __future__ import annotations

import hashlib
import json

import datasets

from ..errors import DataError

PREFIX = "memory:"
_REGISTRY: dict[str, datasets.Dataset] = {}


def is_in_memory(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def register_rows(rows, role: str = "train") -> str:
    """The name under which ``rows`` are read; the same rows get the same name."""
    dataset = as_dataset(rows, role)
    name = f"{PREFIX}{role}-{_fingerprint(dataset)}"
    _REGISTRY[name] = dataset
    return name


def registered_rows(name: str) -> datasets.Dataset:
    if name not in _REGISTRY:
        raise DataError(f"{name} names rows that were given in memory to another process: give the data itself "
                        "(--dataset PATH, or the rows to the Python API)")
    dataset = _REGISTRY[name]
    return dataset.add_column("_source", [name] * len(dataset)).add_column("_row", list(range(1, len(dataset) + 1)))


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


def _fingerprint(dataset: datasets.Dataset) -> str:
    """A digest of the rows' content (not datasets' own fingerprint, which differs between equal in-memory tables)."""
    digest = hashlib.sha256()
    for row in dataset:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
