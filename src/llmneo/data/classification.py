"""Classification rows: ``text`` plus ``label`` (a class name or an integer class id) -> token ids and a class id.

Class names are fixed once, from ``--class_names`` or the training rows, and every split is encoded with them, so
class ids mean the same thing for the teacher, the student and the held-out rows.
"""

from __future__ import annotations

from ..errors import ConfigError, DataError


def parse_class_names(spec: str) -> list[str]:
    names = [name.strip() for name in spec.split(",")]
    if len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"class_names {spec!r}: give at least two distinct, non-empty class names, comma-separated")
    return names


def resolve_class_names(values: list, spec: str | None, source: str) -> list[str]:
    """``--class_names`` if given; else the sorted distinct string labels, or ids 0..max for integer labels."""
    if spec:
        return parse_class_names(spec)
    names = sorted({value for value in values if isinstance(value, str) and value.strip()})
    if any("," in name for name in names):
        raise DataError(f"class name {next(n for n in names if ',' in n)!r} contains a comma, which --class_names "
                        "separates: rename the class", source=source, field="label")
    if names:
        return names
    ids = [int(value) for value in values if isinstance(value, (int, float)) and float(value).is_integer()]
    if not ids or max(ids) < 1:
        raise DataError("fewer than two classes among the labels; give --class_names", source=source, field="label")
    return [str(i) for i in range(max(ids) + 1)]


def label_id(value, names: list[str]) -> int:
    """The class id of one row's label; raises DataError (field 'label') for a label outside the classes."""
    if isinstance(value, float) and value.is_integer():  # Arrow types a column float when any value is
        value = int(value)
    if isinstance(value, float):
        raise DataError(f"class id {value} is not an integer", field="label")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        got = "missing" if value is None else f"got {type(value).__name__}"
        raise DataError(f"expected a class name or an integer class id, {got}", field="label")
    if isinstance(value, int):
        if not 0 <= value < len(names):
            raise DataError(f"class id {value} is outside 0..{len(names) - 1} (classes: {', '.join(names)})",
                            field="label")
        return value
    if value not in names:
        raise DataError(f"unknown class {value!r} (classes: {', '.join(names)})", field="label")
    return names.index(value)


def encode_labelled_text(tokenizer, text, max_length: int) -> list[int]:
    """Token ids of a text to classify, truncated to ``max_length`` (no chat template: the text as it is)."""
    if not isinstance(text, str):
        got = "missing" if text is None else f"expected a string, got {type(text).__name__}"
        raise DataError(got, field="text")
    if not text.strip():
        raise DataError("empty text", field="text")
    return tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
