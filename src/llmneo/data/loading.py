"""Load training rows through `datasets` (local json/jsonl/parquet/csv or a hub id) and tokenize them.

Every row keeps where it came from (``_source`` file and 1-based ``_row`` number within it), so an unusable row
is reported by file, row and field. Rows are checked and tokenized in one `datasets.map`; with ``skip_bad_rows``
unusable rows are dropped and counted, otherwise the first one stops the run.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import json
import logging
import os
from dataclasses import dataclass, field

import datasets

from ..errors import ConfigError, DataError
from .classification import encode_labelled_text, label_id, resolve_class_names
from .formats import detect_format, required_columns, row_to_messages, row_to_text
from .routing import NO_TEACHER, ROUTE_COLUMN, RowRoutes
from ..in_memory import is_in_memory, registered_rows, rows_digest
from ..losses.contract import count_answer_tokens
from .alignment import (ALIGNMENT_COLUMNS, PROMPT_COLUMN, align_rendered, last_answer_prompt, render_messages,
                        render_text)
from .tokenize import encode_messages, encode_text
from .vocabulary import token_bytes

logger = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
JSON_MARKER = "_json_values"  # set on rows whose values are JSON text (files Arrow could not type)
LINE_ERROR = "_line_error"  # why a line could not be read as a row at all (kept only with --skip_bad_rows)
POSITION = "_position"  # a row's index among the rows read, through tokenizing and filtering


@dataclass
class DataReport:
    """What happened to the rows: counted for the run's log and model card."""

    data_format: str
    rows_read: int
    rows_used: int
    answer_tokens: int  # classification: labelled texts
    skipped: list[str] = field(default_factory=list)  # one "file, row, field: reason" line per skipped row
    class_names: list[str] | None = None  # classification: class names in id order
    positions: list[int] = field(default_factory=list)  # each used row's index among the rows read
    held_out: HeldOutRows | None = None  # --eval_ratio: which of the rows read were held out
    rows: datasets.Dataset | None = field(default=None, repr=False, compare=False)  # the rows read (positions index them)


@dataclass(frozen=True)
class HeldOutRows:
    """The rows an --eval_ratio split held out, by index among the rows read, and a digest of their content: what
    `eval` of the run tokenizes instead of every training row, after checking the data still holds them."""

    positions: list[int]
    digest: str

    @classmethod
    def of(cls, rows: datasets.Dataset, positions: list[int]) -> HeldOutRows:
        """In the split's order, which --max_samples of `eval` takes the first of."""
        return cls(list(positions), rows_digest(rows.select(positions)))

    def select(self, rows: datasets.Dataset, source: str) -> datasets.Dataset:
        if self.positions and max(self.positions) >= len(rows):
            raise DataError(f"holds {len(rows)} rows, fewer than when the run held out its rows: it changed since; "
                            "evaluate on a held-out file with --dataset", source=source)
        selected = rows.select(self.positions)
        if rows_digest(selected) != self.digest:
            raise DataError("changed since the run held out its rows (their content differs): evaluate on a held-out "
                            "file with --dataset", source=source)
        return selected


def local_files(spec: str) -> list[str] | None:
    """The local files named by a comma-separated list of paths/globs; None for a hub id or a dataset folder,
    which `datasets.load_dataset` resolves itself."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) == 1 and os.path.isdir(parts[0]):
        return None
    files = []
    for part in parts:
        matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else ([part] if os.path.isfile(part) else [])
        if not matches:
            if len(parts) == 1 and not os.path.splitext(part)[1] and part.count("/") <= 1:
                return None  # looks like a hub id such as "BAAI/Infinity-Instruct"
            raise DataError(f"data file {part} does not exist")
        files.extend(matches)
    return files


def _load_local(path: str, skip_bad_rows: bool = False) -> datasets.Dataset:
    builder = BUILDERS.get(os.path.splitext(path)[1].lower())
    if builder is None:
        raise DataError(f"unsupported file type; expected one of {sorted(BUILDERS)}", source=path)
    if os.path.getsize(path) == 0:
        raise DataError("the file is empty: it has no rows", source=path)
    if builder in ("json", "csv"):
        _check_utf8(path)  # Arrow would read invalid bytes and fail later, far from the file
    if builder == "csv" and not _has_data_line(path):
        raise DataError("the file has no rows (only a header)", source=path)
    try:
        data = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as error:  # Arrow could not read the file: find the offending row for a precise message
        if builder != "json":
            raise DataError(f"cannot read the file: {error}", source=path) from error
        data = _load_json_rows(path, skip_bad_rows)
    if len(data) == 0:
        raise DataError("the file has no rows" + (" (only a header)" if builder == "csv" else ""), source=path)
    numbers = _jsonl_line_numbers(path) if builder == "json" else None
    if numbers is None or len(numbers) != len(data):
        numbers = list(range(1, len(data) + 1))
    return data.add_column("_source", [path] * len(data)).add_column("_row", numbers)


def _jsonl_line_numbers(path: str) -> list[int] | None:
    """The 1-based line of each row of a JSON Lines file (blank lines hold no row), so that a row number is the line
    an editor shows; None for a file holding one JSON array."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    if "".join(lines).lstrip().startswith("["):
        return None
    return [number for number, line in enumerate(lines, start=1) if line.strip()]


def _has_data_line(path: str) -> bool:
    """Whether a CSV file has a non-empty line after its header."""
    with open(path, encoding="utf-8") as handle:
        lines = (line for line in handle if line.strip())
        return next(lines, None) is not None and next(lines, None) is not None


def _check_utf8(path: str, block: int = 1 << 24) -> None:
    decoder, offset, lines = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                line = lines + chunk[: error.start].count(b"\n")
                raise DataError(f"not valid UTF-8 (byte {offset + error.start}, line {line})", source=path) from None
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"not valid UTF-8 (truncated character at byte {offset})", source=path) from None


def _load_json_rows(path: str, skip_bad_rows: bool = False) -> datasets.Dataset:
    """Read a JSON/JSONL file row by row to name the row that Arrow could not read. A malformed line stops the
    load, or with ``skip_bad_rows`` becomes a row marked with its error (skipped and counted later)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"malformed JSON at line {error.lineno}: {error.msg}", source=path) from error
    else:
        rows, errors = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                if not skip_bad_rows:
                    raise DataError(f"malformed JSON: {error.msg}", source=path, row=number) from error
                rows.append({})
                errors.append(f"malformed JSON: {error.msg}")
                continue
            if not isinstance(row, dict):
                raise DataError(f"expected an object, got {type(row).__name__}", source=path, row=number)
            rows.append(row)
            errors.append("")
    if stripped.startswith("["):
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise DataError(f"expected an object, got {type(row).__name__}", source=path, row=number)
        errors = [""] * len(rows)
    logger.info("%s: Arrow could not type its rows; reading it row by row", path)
    # Mixed types across rows are what Arrow refuses: keep every value as JSON text, decoded again per row.
    columns = sorted({key for row in rows for key in row})
    encoded = {key: [json.dumps(row.get(key)) for row in rows] for key in columns}
    encoded[JSON_MARKER] = [True] * len(rows)
    encoded[LINE_ERROR] = errors
    return datasets.Dataset.from_dict(encoded)


def load_rows(data_args, seed: int) -> tuple[datasets.Dataset, str]:
    """All rows (optionally a seeded subset of ``max_samples``) with their source file and row number."""
    files = local_files(data_args.dataset)
    if is_in_memory(data_args.dataset):
        data = _with_origin(registered_rows(data_args.dataset), data_args.dataset)
    elif files is None:
        data = _load_named(data_args)
    else:
        data = _concatenate([_load_local(path, data_args.skip_bad_rows) for path in files])
    fmt = data_args.data_format
    if fmt == "auto":
        fmt = "classification" if data_args.task == "classification" else detect_format(data.column_names, data_args.dataset)
    missing = [c for c in required_columns(fmt) if c not in data.column_names]
    if missing:
        raise DataError(f"format {fmt} needs column(s) {missing}", source=data_args.dataset, field=missing[0])
    if data_args.max_samples is not None and data_args.max_samples < len(data):
        data = data.shuffle(seed=seed).select(range(data_args.max_samples))
    return data, fmt


def _load_named(data_args) -> datasets.Dataset:
    """A hub dataset id or a local dataset folder, with its subset and split."""
    try:
        data = datasets.load_dataset(data_args.dataset, data_args.dataset_config, split=data_args.dataset_split)
    except Exception as error:
        raise DataError(f"cannot load dataset: {error}", source=data_args.dataset) from error
    return _with_origin(data, data_args.dataset)


def _with_origin(data: datasets.Dataset, source: str) -> datasets.Dataset:
    """Rows that name where they were read from (``_source``, 1-based ``_row``), as a file's rows do."""
    return data.add_column("_source", [source] * len(data)).add_column("_row", list(range(1, len(data) + 1)))


def _concatenate(parts: list[datasets.Dataset]) -> datasets.Dataset:
    if len(parts) == 1:
        return parts[0]
    shared = set.intersection(*(set(p.column_names) for p in parts))
    parts = [p.select_columns([c for c in p.column_names if c in shared]) for p in parts]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as error:
        raise DataError(f"the data files have different column types: {error}") from error


@dataclass(frozen=True)
class TeacherSide:
    """What the rows carry for the teacher side: its own tokenizer's rendering and aligned boundaries
    (``tokenizer``, --cross_tokenizer), each on-policy prompt's messages (``keep_prompts``), and each row's teacher
    (``routes``, --teachers with teacher_routing column)."""

    tokenizer: object = None
    keep_prompts: bool = False
    routes: RowRoutes | None = None


def _encoder(tokenizer, fmt: str, max_length: int, class_names: list[str] | None, side: TeacherSide = TeacherSide()):
    main_field = required_columns(fmt)[-1]
    empty_labels = -1 if fmt == "classification" else []  # the column's type either way
    teacher_tokenizer, keep_prompts, routes = side.tokenizer, side.keep_prompts, side.routes
    aligner = (_aligner(tokenizer, teacher_tokenizer, fmt, max_length, keep_prompts) if teacher_tokenizer is not None
               else None)
    empty_alignment = dict.fromkeys(ALIGNMENT_COLUMNS, []) if aligner else {}
    if keep_prompts and aligner:
        empty_alignment[PROMPT_COLUMN] = ""
    if routes is not None:
        empty_alignment[ROUTE_COLUMN] = NO_TEACHER

    def encode_row(row: dict):
        if fmt == "classification":
            return encode_labelled_text(tokenizer, row.get("text"), max_length), label_id(row.get("label"), class_names)
        if fmt == "text":
            return encode_text(tokenizer, row_to_text(row), max_length)
        return encode_messages(tokenizer, row_to_messages(row, fmt), max_length)

    def encode(row: dict) -> dict:
        if row.get(LINE_ERROR):
            return {"input_ids": [], "labels": empty_labels, **empty_alignment,
                    "_error": f"file {row['_source']}, row {row['_row']}: {row[LINE_ERROR]}"}
        if row.get(JSON_MARKER):
            row = {key: value if key.startswith("_") else json.loads(value) for key, value in row.items()}
        try:
            input_ids, labels = encode_row(row)
            aligned = aligner(row, input_ids) if aligner else {}
            if routes is not None:
                aligned[ROUTE_COLUMN] = routes.route(row)
        except DataError as error:
            where = error.field or main_field
            return {"input_ids": [], "labels": empty_labels, **empty_alignment,
                    "_error": f"file {row['_source']}, row {row['_row']}, field '{where}': {error.reason}"}
        return {"input_ids": input_ids, "labels": labels, **aligned, "_error": ""}

    return encode


def _aligner(tokenizer, teacher_tokenizer, fmt: str, max_length: int, keep_prompts: bool):
    """For --cross_tokenizer: a row's teacher tokens and its aligned boundaries (data/alignment.py); with
    ``keep_prompts`` (on-policy steps) also the messages of its on-policy prompt, for the teacher to render."""
    if fmt == "classification":
        raise DataError("distilling across tokenizers is for token-level rows, not classification")
    if keep_prompts and fmt == "text":
        raise ConfigError("on-policy distillation across tokenizers needs conversations (the teacher renders each "
                          "prompt with its own chat template): plain-text rows have no prompt")
    student_bytes, teacher_bytes = token_bytes(tokenizer), token_bytes(teacher_tokenizer)

    def align(row: dict, input_ids: list[int]) -> dict:
        if fmt == "text":
            text = row_to_text(row)
            student, teacher = render_text(tokenizer, text, max_length), render_text(teacher_tokenizer, text, max_length)
        else:
            messages = row_to_messages(row, fmt)
            student = render_messages(tokenizer, messages, max_length)
            teacher = render_messages(teacher_tokenizer, messages, max_length)
        columns = align_rendered(student, teacher, input_ids, student_bytes, teacher_bytes).columns()
        if keep_prompts:
            columns[PROMPT_COLUMN] = json.dumps(last_answer_prompt(student, messages), ensure_ascii=False)
        return columns

    return align


def build_dataset(data_args, tokenizer, seed: int, teacher: TeacherSide = TeacherSide(),
                  only: HeldOutRows | None = None) -> tuple[datasets.Dataset, DataReport]:
    """Tokenized rows (``input_ids``, ``labels``) ready for the collator, and a report of what was dropped; with what
    ``teacher`` asks for beside them (the teacher's own tokens, on-policy prompts, each row's teacher). ``only``:
    tokenize just those rows (a run's held-out rows), checked to be the ones the run held out."""
    rows, fmt = load_rows(data_args, seed)
    if teacher.routes is not None:
        teacher.routes.check_columns(rows.column_names, data_args.dataset)
    class_names = None
    if fmt == "classification":
        values = [json.loads(v) for v in rows["label"]] if JSON_MARKER in rows.column_names else rows["label"]
        class_names = resolve_class_names(values, data_args.class_names, data_args.dataset)
    read = rows
    positions = list(range(len(rows))) if only is None else only.positions
    if only is not None:
        rows = only.select(rows, data_args.dataset)
    rows = rows.add_column(POSITION, positions)
    encoded = rows.map(
        _encoder(tokenizer, fmt, data_args.max_length, class_names, teacher),
        remove_columns=[c for c in rows.column_names if c not in ("_source", "_row", POSITION)],
        load_from_cache_file=False,
        desc="Tokenizing",
    )
    errors = [e for e in encoded["_error"] if e]
    if errors and not data_args.skip_bad_rows:
        raise DataError(errors[0] + " (use --skip_bad_rows to skip such rows)")
    if errors:
        logger.warning("skipped %d unusable row(s); first: %s", len(errors), errors[0])
        encoded = encoded.filter(lambda error: not error, input_columns="_error")
    used = encoded[POSITION]
    encoded = encoded.remove_columns(["_error", "_source", "_row", POSITION])
    if len(encoded) == 0:
        raise DataError("no usable rows left", source=data_args.dataset)
    report = DataReport(fmt, len(rows), len(encoded), _answer_tokens(encoded, fmt), errors, class_names, used, rows=read)
    return encoded, report


def _answer_tokens(encoded: datasets.Dataset, fmt: str) -> int:
    """Tokens trained on: answer tokens, or one class label per text."""
    if fmt == "classification":
        return len(encoded)
    return sum(count_answer_tokens(labels) for labels in encoded["labels"])


def build_datasets(data_args, tokenizer, seed: int, teacher: TeacherSide = TeacherSide()):
    """Training rows, held-out rows (``--eval_split`` or ``--eval_ratio``; None without either) and the report of the
    training rows. Training and the teacher cache both call this, so they see the same rows in the same order."""
    train, report = build_dataset(data_args, tokenizer, seed, teacher)
    held_out = None
    if data_args.eval_ratio > 0:
        if len(train) < 2:
            raise DataError("eval_ratio needs at least 2 usable rows", source=data_args.dataset)
        split = train.add_column(POSITION, report.positions).train_test_split(test_size=data_args.eval_ratio, seed=seed)
        train, held_out = split["train"].remove_columns(POSITION), split["test"]
        held_rows = HeldOutRows.of(report.rows, held_out[POSITION])  # the rows read, not read again
        held_out = held_out.remove_columns([POSITION, *([ROUTE_COLUMN] if teacher.routes else [])])
        report = dataclasses.replace(report, rows_used=len(train), answer_tokens=_answer_tokens(train, report.data_format),
                                     held_out=held_rows)
    elif data_args.eval_split:
        held_out, _ = build_dataset(held_out_arguments(data_args, report.class_names), tokenizer, seed,
                                    dataclasses.replace(teacher, routes=None))  # held-out rows are scored by all
    return train, held_out, report


def held_out_arguments(data_args, class_names: list[str] | None):
    """The data options that read --eval_split's rows (with the training rows' classes)."""
    labels = ",".join(class_names) if class_names else None
    held_out_args = dataclasses.replace(data_args, max_samples=None, class_names=labels)
    if local_files(data_args.eval_split) is not None or is_in_memory(data_args.eval_split):
        held_out_args.dataset = data_args.eval_split
    else:
        held_out_args.dataset_split = data_args.eval_split
    return held_out_args
