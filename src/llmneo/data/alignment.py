"""Where two tokenizations of one conversation can be compared: the aligned boundaries of its answers.

Teacher and student each render the conversation with their own chat template and tokenize it with character
offsets. Inside an answer, the text both renderings share (the longest common prefix of the two answer spans:
the answer itself, plus the end-of-turn marker when the templates agree on it) is cut by each tokenizer at its
token boundaries, counted in UTF-8 bytes of the answer. A token starts where the token before it ends (so that a
token whose offsets leave out its leading space, in ``▁`` vocabularies, starts where a ``Ġ`` token would); a token
that begins inside a character (one byte of a multi-byte character) starts after the bytes of the token before
it, which character offsets cannot show.

At a boundary both models have read the same text and predict what follows it: the student's position is the
token just before the boundary, and likewise for the teacher. Those position pairs are what the cross-tokenizer
KD term compares; the student's CE still uses all of its answer tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import DataError
from .tokenize import assistant_spans
from .vocabulary import token_bytes


ALIGNMENT_COLUMNS = ("teacher_input_ids", "aligned_student", "aligned_teacher")  # the dataset columns of a row


@dataclass
class Alignment:
    """One row's teacher tokens and its aligned boundaries: position pairs in (student, teacher) ids."""

    teacher_input_ids: list[int]
    student_positions: list[int]  # the student token whose logits predict the text after the boundary
    teacher_positions: list[int]

    def columns(self) -> dict[str, list[int]]:
        return dict(zip(ALIGNMENT_COLUMNS, (self.teacher_input_ids, self.student_positions, self.teacher_positions),
                        strict=True))


def byte_offsets(text: str) -> list[int]:
    """UTF-8 bytes of ``text[:c]`` for every c in 0..len(text)."""
    offsets = [0]
    for character in text:
        offsets.append(offsets[-1] + len(character.encode("utf-8")))
    return offsets


def boundary_positions(rendered: Rendering, token_bytes: list, span_start: int, limit: int,
                       to_byte: list[int]) -> dict[int, int]:
    """{byte b of the answer (0 <= b < limit): the position whose logits predict the text from b on};
    ``to_byte``: ``byte_offsets`` of the rendered text.

    A token that starts at a character boundary starts at the byte where the token before it ends; a token that
    starts inside a character (one of its bytes) starts after the bytes of the token before it."""
    ids, offsets = rendered.ids, rendered.offsets
    origin, positions, start = to_byte[span_start], {}, None
    for index in range(1, len(ids)):
        previous_end = offsets[index - 1][1]
        if offsets[index][0] >= previous_end:
            start = to_byte[previous_end]
        else:  # inside a character: known only by counting the previous token's bytes
            previous = token_bytes[ids[index - 1]]
            start = None if start is None or previous is None else start + len(previous)
        if start is not None and 0 <= start - origin < limit:
            positions[start - origin] = index - 1
    return positions


def answer_units(rendered: Rendering, token_bytes: list, span: tuple[int, int]) -> list:
    """The answer span as a sequence to compare: its characters, except that a special token (a chat marker) is
    one unit, its name, so that two markers are never matched on the characters of their names."""
    text, ids, offsets = rendered.text, rendered.ids, rendered.offsets
    special = {start: (end, name) for token, (start, end), name in
               zip(ids, offsets, (text[a:b] for a, b in offsets), strict=True) if token_bytes[token] is None and end > start}
    units, index = [], span[0]
    while index < span[1]:
        if index in special:
            end, name = special[index]
            units.append(("special", name))
            units.extend([None] * (end - index - 1))  # keeps units and characters in step
            index = end
        else:
            units.append(text[index])
            index += 1
    return units


def common_prefix(first: list, second: list) -> int:
    """The units both sequences start with; a special token counts whole or not at all."""
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    while length and first[length - 1] is None:  # stopped inside a special token both have: not shared
        length -= 1
    return length


class Rendering(NamedTuple):
    """A row as one tokenizer sees it: its text, the character spans of its answers, and its token ids with their
    character offsets (cut at the row's max_length)."""

    text: str
    spans: list[tuple[int, int]]
    ids: list[int]
    offsets: list[tuple[int, int]]


def render_messages(tokenizer, messages: list[dict[str, str]], max_length: int) -> Rendering:
    """A conversation as one tokenizer sees it (cut at ``max_length``)."""
    text, spans = assistant_spans(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return Rendering(text, spans, list(encoding["input_ids"])[:max_length], list(encoding["offset_mapping"])[:max_length])


def render_text(tokenizer, text: str, max_length: int) -> Rendering:
    """A plain-text row as one tokenizer sees it (as ``encode_text`` tokenizes it): the whole text is the answer."""
    encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids, offsets = ids + [tokenizer.eos_token_id], offsets + [(len(text), len(text))]
    return Rendering(text, [(0, len(text))], ids[:max_length], offsets[:max_length])


def align_rendered(student: Rendering, teacher: Rendering, student_ids: list[int], student_bytes: list,
                   teacher_bytes: list) -> Alignment:
    """The aligned boundaries of one row rendered by both tokenizers (``render_messages`` / ``render_text``);
    ``student_ids`` is the student's row as training sees it, checked against the rendering; ``*_bytes``: each
    tokenizer's ``token_bytes``."""
    if student.ids != list(student_ids):
        raise DataError("the student's tokens of this row differ from a second rendering of it")
    student_to_byte, teacher_to_byte = byte_offsets(student.text), byte_offsets(teacher.text)
    student_positions, teacher_positions = [], []
    for (s_start, s_end), (t_start, t_end) in zip(student.spans, teacher.spans, strict=True):
        shared = common_prefix(answer_units(student, student_bytes, (s_start, s_end)),
                               answer_units(teacher, teacher_bytes, (t_start, t_end)))
        limit = len(student.text[s_start:s_start + shared].encode("utf-8"))
        student_at = boundary_positions(student, student_bytes, s_start, limit, student_to_byte)
        teacher_at = boundary_positions(teacher, teacher_bytes, t_start, limit, teacher_to_byte)
        for character in sorted(student_at.keys() & teacher_at.keys()):
            student_positions.append(student_at[character])
            teacher_positions.append(teacher_at[character])
    return Alignment(teacher.ids, student_positions, teacher_positions)


# ---------------------------------------------------------------- on-policy answers across tokenizers
#
# On an on-policy step the student's answer is its own sampled tokens, not a rendering of text: its boundaries are
# where its tokens' bytes (token_bytes) start, counted from the answer's first byte, so a tokenization the student
# sampled that the tokenizer would never produce aligns as it is. The teacher reads its own rendering of the row's
# prompt messages followed by the answer's text and is cut by its own tokenizer, exactly as for dataset rows.

PROMPT_COLUMN = "teacher_prompt"  # on-policy across tokenizers: the row's messages before its last answer (JSON)


@dataclass
class AnswerAlignment:
    """One sampled answer against the teacher's rendering: position pairs (the token before each shared boundary,
    in the rollout row and in ``teacher_input_ids``), and the pair at the end of the shared text where both sides
    have a token boundary there (None otherwise): the end of the last byte span the ``sampled`` loss compares."""

    teacher_input_ids: list[int]
    student_positions: list[int]
    teacher_positions: list[int]
    end: tuple[int, int] | None


def last_answer_prompt(rendered: Rendering, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages before the last answer the (possibly truncated) student row still labels: the prompt of that
    row's on-policy answer (rollouts.last_prompt takes the tokens before the same answer)."""
    answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    present = [index for index, (start, end) in zip(answers, rendered.spans, strict=True)
               if any(a < end and b > start for a, b in rendered.offsets)]
    if not present:
        raise DataError("no answer left after truncation to give an on-policy prompt")
    return messages[:present[-1]]


def sampled_units(answer: list[int], token_bytes: list, names: dict[int, str]) -> tuple[list, list[int]]:
    """A sampled answer as the units ``answer_units`` compares (its text's characters, then a special token it
    stops with as one unit) and the byte where each of its tokens starts, then the byte where the last one ends.

    The text is the longest prefix of the answer's bytes that is whole UTF-8 up to its first special token: a
    sample that ends inside a character, or that spells invalid UTF-8, shares nothing beyond it."""
    starts, data = [0], b""
    for token in answer:
        piece = token_bytes[token]
        data += piece if piece is not None else names[token].encode("utf-8")
        starts.append(len(data))
    text_end = next((i for i, token in enumerate(answer) if token_bytes[token] is None), len(answer))
    text_bytes = data[:starts[text_end]]
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        text, text_end = text_bytes[:error.start].decode("utf-8"), -1
    units = list(text)
    if 0 <= text_end < len(answer):  # the answer's text is whole and a special token follows it
        name = names[answer[text_end]]
        units += [("special", name)] + [None] * (len(name) - 1)
    return units, starts


def align_answer(units: list, starts: list[int], prompt_length: int, teacher: Rendering,
                 teacher_bytes: list) -> AnswerAlignment:
    """The aligned boundaries of one sampled answer (its ``sampled_units``, after ``prompt_length`` prompt tokens in
    the rollout row) with ``teacher``, the teacher's ``render_messages`` of the prompt messages and the answer's text."""
    span = teacher.spans[-1]
    shared = common_prefix(units, answer_units(teacher, teacher_bytes, span))
    limit = len(_spelled(units[:shared]))
    student_at = {start: prompt_length + index - 1 for index, start in enumerate(starts) if start <= limit}
    teacher_at = boundary_positions(teacher, teacher_bytes, span[0], limit + 1, byte_offsets(teacher.text))
    shared_bytes = sorted(key for key in student_at.keys() & teacher_at.keys() if key < limit)
    end = (student_at[limit], teacher_at[limit]) if limit in student_at and limit in teacher_at else None
    return AnswerAlignment(teacher.ids, [student_at[b] for b in shared_bytes], [teacher_at[b] for b in shared_bytes],
                           end)


def _spelled(units: list) -> bytes:
    return "".join(unit if isinstance(unit, str) else unit[1] for unit in units if unit is not None).encode("utf-8")


class AnswerAligner:
    """On-policy steps across tokenizers: each sampled answer aligned with the teacher's rendering of its prompt
    messages (``PROMPT_COLUMN``, by row id) followed by the answer's text."""

    def __init__(self, student_tokenizer, teacher_tokenizer, prompts: list[str]):
        self.teacher_tokenizer, self.prompts = teacher_tokenizer, prompts
        self.student_bytes, self.teacher_bytes = token_bytes(student_tokenizer), token_bytes(teacher_tokenizer)
        self.names = {index: student_tokenizer.convert_ids_to_tokens(index)
                      for index, value in enumerate(self.student_bytes) if value is None}

    def align(self, row_id: int, answer: list[int], prompt_length: int) -> AnswerAlignment:
        units, starts = sampled_units(answer, self.student_bytes, self.names)
        text = "".join(unit for unit in units if isinstance(unit, str))
        messages = json.loads(self.prompts[row_id]) + [{"role": "assistant", "content": text}]
        teacher = render_messages(self.teacher_tokenizer, messages, 10**9)  # the prompt fit; the answer is budgeted
        return align_answer(units, starts, prompt_length, teacher, self.teacher_bytes)
