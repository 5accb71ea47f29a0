"""The one-tokenizer check: teacher and student must share a vocabulary (output layers padded to different sizes
are aligned by slicing to the shared range); anything else points to --cross_tokenizer."""

from __future__ import annotations

import logging

from ..errors import VocabularyError
from ..lm_head import output_rows

logger = logging.getLogger(__name__)


def check_vocabularies(student_tokenizer, teacher_tokenizer, student, teacher) -> int:
    """The vocabulary size the KD term compares over (``student``/``teacher``: the models or their output sizes).

    The tokenizers must map the same ids to the same tokens on their shared range. Output layers padded to
    different sizes are aligned by slicing both models' logits to the smaller size, which must still cover every
    id the tokenizer can produce.
    """
    student_vocab = student_tokenizer.convert_ids_to_tokens(range(len(student_tokenizer)))
    teacher_vocab = teacher_tokenizer.convert_ids_to_tokens(range(len(teacher_tokenizer)))
    shared = min(len(student_vocab), len(teacher_vocab))
    differing = [i for i in range(shared) if student_vocab[i] != teacher_vocab[i]]
    if differing:
        first = differing[0]
        raise VocabularyError(
            f"teacher and student tokenizers differ on {len(differing)} of {shared} shared ids (first: id {first} "
            f"is {teacher_vocab[first]!r} for the teacher, {student_vocab[first]!r} for the student); "
            "logit distillation on one vocabulary needs one tokenizer: to distil across tokenizers, add "
            "--cross_tokenizer exact (or uld, hybrid)"
        )
    student_size, teacher_size = (size if isinstance(size, int) else output_rows(size) for size in (student, teacher))
    kd_vocab = min(student_size, teacher_size)
    needed = len(student_tokenizer)
    if kd_vocab < needed:
        raise VocabularyError(
            f"the output layers cover {student_size} (student) and {teacher_size} (teacher) ids, but the tokenizer "
            f"produces ids up to {needed - 1}"
        )
    if student_size != teacher_size:
        logger.warning(
            "vocabulary sizes differ only by padding (student %d, teacher %d): KD compares the first %d logits",
            student_size, teacher_size, kd_vocab,
        )
    return kd_vocab
