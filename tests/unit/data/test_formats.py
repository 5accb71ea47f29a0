"""data/formats.py: every row format becomes chat messages, and every unusable row is named by its field."""

from __future__ import annotations

import pytest

from llmneo.data.formats import detect_format, row_to_messages, row_to_text
from llmneo.errors import DataError


@pytest.mark.parametrize(("columns", "expected"), [(["conversations", "_row"], "sharegpt"), (["messages"], "openai"),
                                                   (["prompt", "completion", "system"], "prompt_completion"),
                                                   (["text", "id"], "text"), (["prompt", "id"], "prompt")])
def test_the_format_is_detected_from_the_columns(columns, expected):
    assert detect_format(columns, "f.jsonl") == expected


def test_unknown_columns_are_named_with_the_file():
    with pytest.raises(DataError, match=r"file f.jsonl: cannot detect the row format from columns \['question'\]"):
        detect_format(["question", "_source"], "f.jsonl")


def test_each_format_becomes_the_same_messages():
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                  {"from": "gpt", "value": "A"}]}
    openai = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                           {"role": "assistant", "content": "A"}]}
    prompt = {"system": "S", "prompt": "Q", "completion": "A"}
    expected = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}]
    assert row_to_messages(sharegpt, "sharegpt") == row_to_messages(openai, "openai") == \
        row_to_messages(prompt, "prompt_completion") == expected


@pytest.mark.parametrize(("row", "fmt", "field", "message"), [
    ({"conversations": "hi"}, "sharegpt", "conversations", "expected a list of turns, got str"),
    ({"conversations": []}, "sharegpt", "conversations", "empty conversation"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", "conversations[0].from", "unknown role 'bot'"),
    ({"conversations": [{"from": "human", "value": 3}]}, "sharegpt", "conversations[0].value", "expected a string"),
    ({"messages": [{"role": "user", "content": "Q"}]}, "openai", "messages", "no assistant answer to train on"),
    ({"prompt": "Q", "completion": " "}, "prompt_completion", "completion", "no assistant answer to train on"),
    ({"prompt": "Q"}, "prompt_completion", "completion", "missing"),
    ({"prompt": " "}, "prompt", "prompt", "empty prompt"),
    ({"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}, "prompt", "prompt",
     "the prompt must end with a user turn, not assistant"),
    ({"prompt": [{"role": "user", "content": 3}]}, "prompt", "prompt[0].content", "expected a string"),
])
def test_unusable_rows_name_their_field(row, fmt, field, message):
    with pytest.raises(DataError, match=message) as error:
        row_to_messages(row, fmt)
    assert error.value.field == field


def test_a_prompt_alone_becomes_its_turns_and_an_empty_answer():
    """TRL's prompt-only rows: a string is one user turn; a conversation is kept; the answer is the student's."""
    answer = {"role": "assistant", "content": ""}
    assert row_to_messages({"prompt": "Q"}, "prompt") == [{"role": "user", "content": "Q"}, answer]
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert row_to_messages({"prompt": conversation}, "prompt") == [*conversation, answer]


def test_plain_text_rows():
    assert row_to_text({"text": "hello"}) == "hello"
    for row, message in (({"text": "  "}, "empty text"), ({}, "missing"), ({"text": 1}, "expected a string")):
        with pytest.raises(DataError, match=message):
            row_to_text(row)
