"""The one place a run's settings choose its teacher source, and the steps of a run that depend on it.

The registered source classes (teacher/sources.py, teacher/signal.py) are asked in order whether the run's
settings choose them (``chosen``); the first that says yes is the run's kind of source for every step: the checks
before any model loads (``connect``), the teacher's own tokenizer for the data side (``reading_tokenizer``), the
cache it reads (``open_cache``), whether the teacher model is loaded (``loads_teacher``) and the source itself
(``build``). The pipeline, ``cache-teacher`` and the tests ask here; none of them looks at the options that decide.
"""

from __future__ import annotations

import logging

from ..adapters.lora import with_adapter
from ..models.loading import load_student
from .loading import load_teacher
from .ensemble import TeacherEnsemble
from .signal import NoTeacher, RunModels, SourceParts, TeacherSignal
from .sources import AlignedCachedTeacher, AlignedOnlineTeacher, CachedTeacher, OnlineTeacher, ServedTeacher

logger = logging.getLogger(__name__)

# Asked in this order: several teachers (each member then chosen here as a one-teacher run), a served teacher, then
# a cache (a teacher_model beside it only identifies the cache's teacher), then a loaded teacher, and no teacher last.
SOURCES: list[type[TeacherSignal]] = [TeacherEnsemble, ServedTeacher, AlignedCachedTeacher, CachedTeacher, AlignedOnlineTeacher,
                                      OnlineTeacher, NoTeacher]


def register_source(source: type[TeacherSignal]) -> None:
    """Add a source class, asked before the built-in ones."""
    SOURCES.insert(0, source)


def unregister_source(source: type[TeacherSignal]) -> None:
    SOURCES.remove(source)


def source_kind(config) -> type[TeacherSignal]:
    """The run's kind of teacher source."""
    return next(source for source in SOURCES if source.chosen(config))


def connect_teacher(config, tokenizer):
    """What the source checks before any model loads (a served teacher must answer); passed on to ``build``."""
    return source_kind(config).connect(config, tokenizer)


def reading_teacher_tokenizer(config):
    """The teacher's own tokenizer when it reads its own rendering of each row, else None."""
    return source_kind(config).reading_tokenizer(config)


def open_run_cache(config, tokenizer, dataset, data: dict):
    """The teacher cache the run reads (checked against its rows), or None."""
    return source_kind(config).open_cache(config, tokenizer, dataset, data)


def load_models(config, tokenizer, head=None, teacher_tokenizer=None) -> RunModels:
    """The student (with its adapter for lora/neo) and, when the source reads one, the frozen teacher."""
    student = load_student(config.model, head)
    teacher = load_teacher(config.model, head=head) if source_kind(config).loads_teacher else None
    return RunModels(tokenizer, with_adapter(config, student), teacher, teacher_tokenizer, head)


def teacher_signal(config, models: RunModels, cache=None, dataset=None, connection=None) -> TeacherSignal:
    """The run's teacher source, built from its models and what the earlier steps opened (``dataset``: the
    training rows, whose prompt messages an on-policy run across tokenizers renders for the teacher)."""
    signal = source_kind(config).build(config, SourceParts(models, cache, connection, dataset))
    logger.info("teacher signal: %s", type(signal).__name__)
    return signal
