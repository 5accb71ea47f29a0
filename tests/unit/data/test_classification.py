"""data/classification.py: class names fixed once, label ids checked against them."""

from __future__ import annotations

import pytest

from llmneo.data.classification import encode_labelled_text, label_id, parse_class_names, resolve_class_names
from llmneo.errors import ConfigError, DataError


def test_class_names_come_from_the_option_the_names_or_the_ids():
    assert resolve_class_names(["b", "a", "b"], None, "f") == ["a", "b"]
    assert resolve_class_names([2, 0, 1.0], None, "f") == ["0", "1", "2"]
    assert resolve_class_names(["x"], "neg, pos", "f") == ["neg", "pos"]


@pytest.mark.parametrize("spec", ["one", "a,,b", "a,a"])
def test_bad_class_name_options_are_refused(spec):
    with pytest.raises(ConfigError, match="at least two distinct, non-empty class names"):
        parse_class_names(spec)


def test_labels_that_cannot_define_classes_are_named():
    with pytest.raises(DataError, match="fewer than two classes"):
        resolve_class_names([0, 0], None, "f.csv")
    with pytest.raises(DataError, match="contains a comma"):
        resolve_class_names(["a,b", "c"], None, "f.csv")


@pytest.mark.parametrize(("value", "expected"), [("pos", 1), (0, 0), (1.0, 1)])
def test_label_ids(value, expected):
    assert label_id(value, ["neg", "pos"]) == expected


@pytest.mark.parametrize(("value", "message"), [("meh", "unknown class 'meh'"), (2, r"class id 2 is outside 0..1"),
                                                (0.5, "is not an integer"), (None, "missing"), (True, "got bool")])
def test_bad_labels_name_the_label_field(value, message):
    with pytest.raises(DataError, match=message) as error:
        label_id(value, ["neg", "pos"])
    assert error.value.field == "label"


def test_texts_are_encoded_without_a_template_and_truncated(tokenizer):
    ids = encode_labelled_text(tokenizer, "the sea is calm tonight and the wind is low", max_length=4)
    assert ids == tokenizer("the sea is calm tonight and the wind is low")["input_ids"][:4]
    with pytest.raises(DataError, match="empty text"):
        encode_labelled_text(tokenizer, " ", 8)
