"""Rows given as Python objects (data/in_memory.py) are read like a file of the same rows, and a run's config names
them so that another process says what to give instead."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from llmneo.config import DataArguments
from llmneo.in_memory import register_rows
from llmneo.data.loading import build_dataset
from llmneo.demo.tiny import corpus_rows
from llmneo.errors import DataError


def rows_as(kind: str, rows: list[dict]):
    if kind == "Dataset":
        return datasets.Dataset.from_list(rows)
    if kind == "IterableDataset":
        return datasets.Dataset.from_list(rows).to_iterable_dataset()
    if kind == "dict of columns":
        return {key: [row[key] for row in rows] for key in rows[0]}
    return rows


@pytest.mark.parametrize("kind", ["Dataset", "IterableDataset", "list of dicts", "dict of columns"])
def test_rows_in_memory_tokenize_as_the_same_rows_in_a_file(kind, tokenizer, tmp_path):
    rows = corpus_rows()[:6]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    from_file, file_report = build_dataset(DataArguments(dataset=str(path), max_length=64), tokenizer, seed=0)
    name = register_rows(rows_as(kind, rows))
    assert name.startswith("memory:train-")
    in_memory, report = build_dataset(DataArguments(dataset=name, max_length=64), tokenizer, seed=0)
    assert in_memory["input_ids"] == from_file["input_ids"] and in_memory["labels"] == from_file["labels"]
    assert (report.rows_used, report.answer_tokens) == (file_report.rows_used, file_report.answer_tokens)


def test_equal_rows_get_one_name_and_other_rows_another():
    rows = corpus_rows()[:4]
    assert register_rows(rows) == register_rows(datasets.Dataset.from_list(rows))
    assert register_rows(rows) != register_rows(corpus_rows()[1:5])
    assert register_rows(rows, "eval").startswith("memory:eval-")


def test_a_name_from_another_process_and_rows_that_are_not_dicts_are_refused(tokenizer):
    with pytest.raises(DataError, match=r"memory:train-0123 names rows that were given in memory to another "
                                        r"process: give the data itself \(--dataset PATH"):
        build_dataset(DataArguments(dataset="memory:train-0123"), tokenizer, seed=0)
    with pytest.raises(DataError, match=r"train rows: row 2 is a str; expected a dict of column: value per row"):
        register_rows([{"text": "a"}, "b"])
    with pytest.raises(DataError, match=r"must be a datasets.Dataset, an IterableDataset, a list of row dicts or a "
                                        r"dict of columns, got int"):
        register_rows(3)


def test_a_loaded_model_is_named_by_its_directory_until_its_weights_change(models_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from llmneo.in_memory import model_name

    model = AutoModelForCausalLM.from_pretrained(models_dir["student"])
    assert model_name(model, "student") == str(Path(models_dir["student"]).resolve())
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1.0
    name = model_name(model, "student")
    assert name.startswith("memory:student-") and name != model_name(
        AutoModelForCausalLM.from_pretrained(models_dir["student"]).to(torch.float64), "student")


def test_a_memory_model_name_outside_its_run_is_refused_in_one_line():
    from llmneo.errors import ConfigError
    from llmneo.models.loading import load_pretrained_model

    with pytest.raises(ConfigError, match=r"^teacher model memory:teacher-ab12 was an in-memory model of the process "
                                          r"that trained the run, saved nowhere: save it \(save_pretrained\) and give "
                                          r"its path \(--teacher_model PATH\)$"):
        load_pretrained_model("memory:teacher-ab12", "teacher")


def test_a_model_with_tied_embeddings_is_still_named_by_its_directory(tokenizer, tmp_path):
    """The output head shares the embedding and is saved once: counted once, not as a weight the files lack."""
    from transformers import AutoModelForCausalLM

    from llmneo.demo.tiny import build_tiny_llama
    from llmneo.in_memory import model_name

    build_tiny_llama(tokenizer, tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model_name(model, "student") == str((tmp_path / "tied").resolve())
