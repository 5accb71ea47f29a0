"""Column routing's data side (data/routing.py): each row's teacher column as the index of its teacher, and the
bad values by file, row and field; and a batch's rows as a batch of their own (data/collators.batch_rows)."""

import pytest
import torch

from conftest import write_jsonl
from llmneo.config import DataArguments
from llmneo.data.collators import batch_rows
from llmneo.data.loading import TeacherSide, build_dataset, build_datasets
from llmneo.data.routing import NO_TEACHER, ROUTE_COLUMN, RowRoutes
from llmneo.demo.tiny import build_tokenizer, corpus_texts
from llmneo.errors import DataError

ROWS = [{"prompt": f"Say {word}.", "completion": f"{word}!", "teacher": teacher}
        for word, teacher in (("one", "code"), ("two", "chat"), ("three", None), ("four", ""), ("five", "chat"))]
ROUTES = RowRoutes("teacher", ("chat", "code"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(corpus_texts())


def test_each_row_carries_its_teachers_index(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    dataset, report = build_dataset(DataArguments(dataset=path), tokenizer, 0, TeacherSide(routes=ROUTES))
    assert dataset[ROUTE_COLUMN] == [1, 0, NO_TEACHER, NO_TEACHER, 0] and report.rows_used == 5
    plain, _ = build_dataset(DataArguments(dataset=path), tokenizer, 0)
    assert ROUTE_COLUMN not in plain.column_names and plain["input_ids"] == dataset["input_ids"]
    train, held_out, _ = build_datasets(DataArguments(dataset=path, eval_ratio=0.4), tokenizer, 0, TeacherSide(routes=ROUTES))
    assert ROUTE_COLUMN in train.column_names and ROUTE_COLUMN not in held_out.column_names
    # --eval_split rows are scored by every teacher: they need no teacher column and carry no route
    split = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "Say six.", "completion": "six!"}])
    _, held_out, _ = build_datasets(DataArguments(dataset=path, eval_split=split), tokenizer, 0, TeacherSide(routes=ROUTES))
    assert len(held_out) == 1 and ROUTE_COLUMN not in held_out.column_names


def test_an_unknown_teacher_is_a_bad_row(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [*ROWS, {"prompt": "Hi.", "completion": "Hello.", "teacher": "maths"}])
    with pytest.raises(DataError, match=f"file {path}, row 6, field 'teacher': names teacher 'maths', which is not "
                                        "one of --teachers \\(chat, code\\) \\(use --skip_bad_rows"):
        build_dataset(DataArguments(dataset=path), tokenizer, 0, TeacherSide(routes=ROUTES))
    dataset, report = build_dataset(DataArguments(dataset=path, skip_bad_rows=True), tokenizer, 0, TeacherSide(routes=ROUTES))
    assert len(dataset) == 5 and len(report.skipped) == 1 and "row 6" in report.skipped[0]


def test_on_policy_rows_must_name_a_teacher(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    with pytest.raises(DataError, match="row 3, field 'teacher': names no teacher, and on-policy steps score each "
                                        "row's answers by its teacher"):
        build_dataset(DataArguments(dataset=path), tokenizer, 0, TeacherSide(routes=RowRoutes("teacher", ("chat", "code"), True)))


def test_a_missing_column_names_the_option(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    with pytest.raises(DataError, match="field 'expert': teacher_routing column reads each row's teacher from a "
                                        "'expert' column, which the data lacks: .*--teacher_column"):
        build_dataset(DataArguments(dataset=path), tokenizer, 0, TeacherSide(routes=RowRoutes("expert", ("chat", "code"))))


def test_batch_rows_keeps_the_rows_and_their_aligned_boundaries():
    batch = {"input_ids": torch.arange(12).view(3, 4), "labels": torch.arange(12).view(3, 4) + 100,
             "row_id": torch.tensor([7, 8, 9]), "teacher_input_ids": torch.arange(15).view(3, 5),
             "aligned_row": torch.tensor([0, 0, 1, 2, 2, 2]), "aligned_student": torch.tensor([1, 2, 1, 0, 2, 3]),
             "aligned_teacher": torch.tensor([2, 4, 1, 0, 3, 4]), "flag": "kept"}
    picked = batch_rows(batch, torch.tensor([0, 2]))
    assert picked["input_ids"].tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert picked["row_id"].tolist() == [7, 9] and picked["teacher_input_ids"].tolist() == [list(range(5)),
                                                                                           list(range(10, 15))]
    assert picked["aligned_row"].tolist() == [0, 0, 1, 1, 1]  # row 2 is now row 1
    assert picked["aligned_student"].tolist() == [1, 2, 0, 2, 3]
    assert picked["aligned_teacher"].tolist() == [2, 4, 0, 3, 4] and picked["flag"] == "kept"
