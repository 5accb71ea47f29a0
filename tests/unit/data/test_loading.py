"""Row formats -> token ids and assistant-only labels (checked token by token), and every bad-row message."""

import pytest

from conftest import write_jsonl
from llmneo.config import DataArguments
from llmneo.data.loading import build_dataset
from llmneo.data.tokenize import ensure_chat_template
from llmneo.demo.tiny import build_tokenizer, corpus_texts
from llmneo.errors import DataError

SYSTEM, Q1, A1, Q2, A2 = "Be brief.", "What colour is the sky?", "The sky is blue.", "Add one and two.", "One plus two is three."


def expected_from_segments(tokenizer, segments):
    """Tokenize each (text, trained) segment on its own: the independent reference for ids and labels."""
    ids, labels = [], []
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return ids, labels


def chatml_segments():
    return [
        (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n", False),
        (f"{A1}<|im_end|>\n", True),
        (f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n", False),
        (f"{A2}<|im_end|>\n", True),
    ]


def encode_rows(tmp_path, tokenizer, rows, **data_args):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    dataset, report = build_dataset(DataArguments(dataset=path, **data_args), tokenizer, seed=0)
    return dataset, report, path


SHAREGPT = {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": Q1},
                              {"from": "gpt", "value": A1}, {"from": "human", "value": Q2}, {"from": "gpt", "value": A2}]}
OPENAI = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
                       {"role": "assistant", "content": A1}, {"role": "user", "content": Q2},
                       {"role": "assistant", "content": A2}]}


@pytest.mark.parametrize("row", [SHAREGPT, OPENAI], ids=["sharegpt", "openai"])
def test_multi_turn_labels_every_assistant_turn(tmp_path, tokenizer, row):
    dataset, report, _ = encode_rows(tmp_path, tokenizer, [row])
    ids, labels = expected_from_segments(tokenizer, chatml_segments())
    assert dataset[0]["input_ids"] == ids
    assert dataset[0]["labels"] == labels
    trained = tokenizer.decode([t for t in dataset[0]["labels"] if t != -100])
    assert trained == f"{A1}<|im_end|>\n{A2}<|im_end|>\n"
    assert report.data_format == ("sharegpt" if "conversations" in row else "openai")


def test_prompt_completion_labels_only_the_completion(tmp_path, tokenizer):
    dataset, _, _ = encode_rows(tmp_path, tokenizer, [{"system": SYSTEM, "prompt": Q1, "completion": A1}])
    ids, labels = expected_from_segments(tokenizer, chatml_segments()[:2])
    assert (dataset[0]["input_ids"], dataset[0]["labels"]) == (ids, labels)


def test_plain_text_trains_on_every_token(tmp_path, tokenizer):
    text = "The sky is blue and the grass is green."
    dataset, report, _ = encode_rows(tmp_path, tokenizer, [{"text": text}])
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert dataset[0]["input_ids"] == ids and dataset[0]["labels"] == ids
    assert report.data_format == "text"


def test_fallback_template_when_tokenizer_has_none(tmp_path):
    bare = build_tokenizer(corpus_texts(), chat_template=False)
    assert ensure_chat_template(bare) is True
    dataset, _, _ = encode_rows(tmp_path, bare, [{"messages": OPENAI["messages"][1:3]}])
    ids, labels = expected_from_segments(bare, [(f"<|user|>\n{Q1}\n<|assistant|>\n", False), (f"{A1}</s>\n", True)])
    assert (dataset[0]["input_ids"], dataset[0]["labels"]) == (ids, labels)


def test_truncation_keeps_the_part_of_the_answer_that_fits(tmp_path, tokenizer):
    full_ids, full_labels = expected_from_segments(tokenizer, chatml_segments())
    cut = len(expected_from_segments(tokenizer, chatml_segments()[:1])[0]) + 3
    dataset, _, _ = encode_rows(tmp_path, tokenizer, [SHAREGPT], max_length=cut)
    assert dataset[0]["input_ids"] == full_ids[:cut] and dataset[0]["labels"] == full_labels[:cut]


GOOD = {"conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1}]}
BAD_ROWS = {
    "missing field": ({"conversations": [{"from": "human", "value": Q1}, {"from": "gpt"}]},
                      "conversations[1].value", "missing"),
    "wrong type": ({"conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": 5}]},
                   "conversations[1].value", "expected a string, got int"),
    "conversation not a list": ({"conversations": "hi"}, "conversations", "expected a list of turns, got str"),
    "unknown role": ({"conversations": [{"from": "human", "value": Q1}, {"from": "bot", "value": A1}]},
                     "conversations[1].from", "unknown role 'bot'"),
    "empty conversation": ({"conversations": []}, "conversations", "empty conversation"),
    "no answer": ({"conversations": [{"from": "human", "value": Q1}]}, "conversations", "no assistant answer"),
    "answer truncated away": ({"conversations": [{"from": "human", "value": Q1 * 20}, {"from": "gpt", "value": A1}]},
                              "conversations", "no answer tokens left after truncation to max_length=64"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_names_file_row_and_field(tmp_path, tokenizer, case):
    bad, field, reason = BAD_ROWS[case]
    with pytest.raises(DataError) as error:
        encode_rows(tmp_path, tokenizer, [GOOD, GOOD, bad, GOOD], max_length=64)
    message = str(error.value)
    path = str(tmp_path / "rows.jsonl")
    assert f"file {path}, row 3, field '{field}': {reason}" in message
    assert "--skip_bad_rows" in message


def test_skip_bad_rows_skips_and_counts(tmp_path, tokenizer):
    rows = [GOOD] + [BAD_ROWS[case][0] for case in sorted(BAD_ROWS)] + [GOOD]
    dataset, report, _ = encode_rows(tmp_path, tokenizer, rows, max_length=64, skip_bad_rows=True)
    assert len(dataset) == 2 and report.rows_used == 2 and report.rows_read == len(rows)
    assert len(report.skipped) == len(BAD_ROWS)
    assert [line.split(", field")[0].rsplit("row ", 1)[1] for line in report.skipped] == [
        str(i) for i in range(2, 2 + len(BAD_ROWS))]


def test_malformed_json_line_is_named(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD, "", '{"conversations": [', GOOD])  # a blank line is no row
    with pytest.raises(DataError, match=r"rows.jsonl, row 3: malformed JSON: Expecting value"):
        build_dataset(DataArguments(dataset=path), tokenizer, seed=0)


def test_non_utf8_file_is_named(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl: not valid UTF-8 .*line 2"):
        build_dataset(DataArguments(dataset=str(path)), tokenizer, seed=0)


def test_undetectable_format_and_missing_file(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"cannot detect the row format from columns \['answer', 'question'\]"):
        build_dataset(DataArguments(dataset=path), tokenizer, seed=0)
    with pytest.raises(DataError, match=r"data file .*nothing.jsonl does not exist"):
        build_dataset(DataArguments(dataset=str(tmp_path / "nothing.jsonl")), tokenizer, seed=0)


@pytest.mark.parametrize("suffix", ["parquet", "csv", "json"])
def test_other_file_types_round_trip(tmp_path, tokenizer, suffix):
    import datasets

    rows = [{"prompt": Q1, "completion": A1}, {"prompt": Q2, "completion": A2}]
    path = str(tmp_path / f"rows.{suffix}")
    table = datasets.Dataset.from_list(rows)
    {"parquet": table.to_parquet, "csv": table.to_csv, "json": lambda p: table.to_json(p, lines=False)}[suffix](path)
    reference, _, _ = encode_rows(tmp_path, tokenizer, rows)
    dataset, report = build_dataset(DataArguments(dataset=path), tokenizer, seed=0)
    assert dataset["input_ids"] == reference["input_ids"] and dataset["labels"] == reference["labels"]


def test_max_samples_is_a_seeded_subset(tmp_path, tokenizer):
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(20)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    first, _ = build_dataset(DataArguments(dataset=path, max_samples=5), tokenizer, seed=1)
    again, _ = build_dataset(DataArguments(dataset=path, max_samples=5), tokenizer, seed=1)
    other, _ = build_dataset(DataArguments(dataset=path, max_samples=5), tokenizer, seed=2)
    assert len(first) == 5 and first["input_ids"] == again["input_ids"] and first["input_ids"] != other["input_ids"]


def test_dataset_folder_loads_like_a_hub_dataset(tmp_path, tokenizer):
    """A folder goes through `datasets.load_dataset(id, config, split=...)`, the path hub ids take."""
    folder = tmp_path / "my_dataset"
    (folder / "data").mkdir(parents=True)
    write_jsonl(folder / "data" / "train-00000.jsonl", [GOOD, SHAREGPT])
    write_jsonl(folder / "data" / "test-00000.jsonl", [GOOD])
    train, _ = build_dataset(DataArguments(dataset=str(folder)), tokenizer, seed=0)
    test, _ = build_dataset(DataArguments(dataset=str(folder), dataset_split="test"), tokenizer, seed=0)
    assert len(train) == 2 and len(test) == 1
    with pytest.raises(DataError, match=r"my_dataset: cannot load dataset: .*validation"):
        build_dataset(DataArguments(dataset=str(folder), dataset_split="validation"), tokenizer, seed=0)


def test_rows_arrow_cannot_type_are_read_row_by_row(tmp_path, tokenizer, monkeypatch):
    """Older `datasets` releases refuse mixed-type columns; the row-by-row reader must give the same rows."""
    import datasets

    reference, _, _ = encode_rows(tmp_path, tokenizer, [GOOD, SHAREGPT])
    real_load = datasets.load_dataset

    def refuse_json(builder, *args, **kwargs):
        if builder == "json":
            raise ValueError("JSON parse error: Column(/conversations) changed from array to string")
        return real_load(builder, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", refuse_json)
    dataset, _, _ = encode_rows(tmp_path, tokenizer, [GOOD, SHAREGPT])
    assert dataset["input_ids"] == reference["input_ids"] and dataset["labels"] == reference["labels"]
    with pytest.raises(DataError, match=r"row 2, field 'conversations': expected a list of turns, got str"):
        encode_rows(tmp_path, tokenizer, [GOOD, {"conversations": "hi"}, GOOD])
    skipped, report, _ = encode_rows(tmp_path, tokenizer, [GOOD, {"conversations": "hi"}], skip_bad_rows=True)
    assert len(skipped) == 1 and len(report.skipped) == 1
