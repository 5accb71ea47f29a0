"""The teacher sources (teacher/signal.py): one class each.

| source | teacher | targets |
|---|---|---|
| ``OnlineTeacher`` | loaded, on the student's tokens | its final hidden states and head (fused, liger) or logits (naive) |
| ``CachedTeacher`` | its top-k cache (teacher/cache.py) | the cached rows of the batch's answer tokens |
| ``AlignedOnlineTeacher`` | loaded, with its own tokenizer | its rows at the answers' aligned boundaries |
| ``AlignedCachedTeacher`` | its cache captured across tokenizers | the cached top-k at those boundaries |
| ``ServedTeacher`` | served by vLLM (teacher/server.py) | its top-k of the batch's answer tokens, fetched ahead |
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..data.alignment import AnswerAligner
from ..data.collators import AlignedCollator, AlignedSpans, rendered_answers
from ..data.packing import forward_inputs, packed_row_index
from ..data.alignment import PROMPT_COLUMN
from ..data.vocabulary import build_vocabulary_map
from ..errors import DataError, TeacherServerError, VocabularyError
from ..lm_head import output_rows
from ..losses.vocab_map import load_vocabulary_map
from ..methods import METHODS
from ..models.loading import load_tokenizer
from ..models.vocabulary_check import check_vocabularies
from ..evaluation.cross_tokenizer import aligned_batches, evaluate_aligned, teacher_mapped_mass
from ..lm_head import output_head
from ..losses.contract import answer_mask
from ..losses.cross_vocab import from_logit_rows, from_topk, logit_rows
from ..losses.cross_vocab_modes import CrossVocabMode, cross_vocab_mode
from ..losses.targets import (AlignedSampledTargets, AlignedTargets, HiddenStates, Logits, StudentSide, TeacherTargets,
                              TokenTargets, TopK)
from ..losses.topk import TopKRows
from ..losses.vocab_map import VocabularyMap
from .cache import TeacherCache, cached_vocab_size, open_teacher_cache
from .online import rows_at, span_log_probs, teacher_final_hidden, teacher_logits
from ..rollouts import ROLLOUT
from ..runtime.identity import same_probe
from .server import ServerSettings, TeacherServer
from .signal import RunModels, SourceParts, TeacherSignal

logger = logging.getLogger(__name__)


class OnlineTeacher(TeacherSignal):
    """A loaded teacher on the student's own tokens: one forward pass per batch, without gradient."""

    loads_teacher = True

    def __init__(self, teacher: torch.nn.Module, kd_vocab_size: int | None):
        self.teacher, self.kd_vocab_size = teacher, kd_vocab_size

    @classmethod
    def chosen(cls, config) -> bool:
        return METHODS[config.training.method].uses_teacher and config.model.teacher_model is not None

    @classmethod
    def build(cls, config, parts: SourceParts) -> TeacherSignal:
        """The shared vocabulary is checked here: same tokenizer, padded output sizes sliced to the shared range."""
        models = parts.models
        teacher_tokenizer = load_tokenizer(config.model.teacher_model, config.model.trust_remote_code, "teacher")
        sizes = ((models.student, models.teacher) if models.head is None
                 else (len(models.tokenizer), len(teacher_tokenizer)))  # a classifier's inputs only
        return cls(models.teacher, check_vocabularies(models.tokenizer, teacher_tokenizer, *sizes))

    def targets(self, inputs: dict, student: StudentSide) -> TeacherTargets:
        teacher_inputs = forward_inputs(inputs, self.teacher)
        if student.reads_hidden_states:
            return TokenTargets(HiddenStates(teacher_final_hidden(self.teacher, **teacher_inputs),
                                             output_head(self.teacher).weight))
        return TokenTargets(Logits(teacher_logits(self.teacher, **teacher_inputs)))

    def scoring_teacher(self) -> torch.nn.Module:
        return self.teacher


class CachedTeacher(TeacherSignal):
    """The teacher's top-k rows from its offline cache, keyed by the batch's ``row_id``; no teacher is loaded."""

    def __init__(self, cache: TeacherCache, kd_vocab_size: int):
        self.cache, self.kd_vocab_size = cache, kd_vocab_size

    @classmethod
    def chosen(cls, config) -> bool:
        return config.training.teacher_cache is not None

    @classmethod
    def open_cache(cls, config, tokenizer, dataset, data: dict) -> TeacherCache:
        return open_teacher_cache(config, tokenizer, dataset, data)

    @classmethod
    def build(cls, config, parts: SourceParts) -> TeacherSignal:
        return cls(parts.cache, cached_vocab_size(parts.cache, output_rows(parts.models.student)))

    def targets(self, inputs: dict, student: StudentSide) -> TeacherTargets:
        """The batch's cached rows, after checking they cover exactly its answer positions."""
        row_ids = inputs["row_id"].tolist()
        for row, count in zip(row_ids, _answer_tokens_per_row(inputs), strict=True):
            cached = self.cache.row_answer_tokens(row)
            if cached != count:
                raise DataError(f"teacher cache {self.cache.cache_dir} holds {cached} answer tokens for training row "
                                f"{row} but the batch has {count}: it was captured from other data")
        return TokenTargets(TopK(self.cache.rows(row_ids).to(inputs["labels"].device)))

    def identity(self) -> dict:
        return _cache_identity(self.cache)


class AlignedOnlineTeacher(TeacherSignal):
    """A loaded teacher with its own tokenizer (``--cross_tokenizer``): it reads its own rendering of each row, and
    the KD term compares both models at the answers' aligned boundaries (data/alignment.py)."""

    def __init__(self, teacher: torch.nn.Module, teacher_tokenizer, vocab_map: VocabularyMap, mode: CrossVocabMode,
                 answers: AnswerAligner | None = None):
        self.teacher, self.teacher_tokenizer, self.vocab_map, self.mode = teacher, teacher_tokenizer, vocab_map, mode
        self.answers = answers  # on-policy runs: aligns the student's sampled answers with the teacher's rendering

    loads_teacher = True
    reads_own_rendering = True

    @classmethod
    def chosen(cls, config) -> bool:
        return config.training.cross_tokenizer is not None and config.model.teacher_model is not None

    @classmethod
    def build(cls, config, parts: SourceParts) -> TeacherSignal:
        """With the vocabulary map (saved in the run directory) and, for on-policy rows that keep their prompt
        messages, the aligner of the student's sampled answers."""
        models, dataset = parts.models, parts.dataset
        vocab_map = cross_vocabulary_map(config, models)
        answers = (AnswerAligner(models.tokenizer, models.teacher_tokenizer, dataset[PROMPT_COLUMN])
                   if dataset is not None and PROMPT_COLUMN in dataset.column_names else None)
        return cls(models.teacher, models.teacher_tokenizer, vocab_map, cross_vocab_mode(config.training.cross_tokenizer),
                   answers)

    def attach(self, teacher, device) -> None:
        self.teacher, self.vocab_map = teacher, self.vocab_map.to(device)

    def collator(self, padded, tokenizer):
        return AlignedCollator(padded, tokenizer.padding_side, self.teacher_tokenizer.pad_token_id)

    def targets(self, inputs: dict, student: StudentSide) -> TeacherTargets:
        if ROLLOUT in inputs:
            inputs = {**inputs, **self._rendered_answers(inputs)[0]}
        rows = inputs["aligned_row"]
        teacher_rows, weight = rows_at(self.teacher, inputs["teacher_input_ids"], inputs["teacher_attention_mask"], rows,
                                       inputs["aligned_teacher"])
        return AlignedTargets(rows, inputs["aligned_student"], from_logit_rows(teacher_rows, self.vocab_map, self.mode,
                                                                               weight), self.vocab_map)

    def sampled_targets(self, inputs: dict, student: StudentSide) -> TeacherTargets:
        """The teacher's log-probability of each aligned byte span of the student's answers (its tokens in it)."""
        teacher, spans = self._rendered_answers(inputs)
        totals = span_log_probs(self.teacher, teacher, spans)
        student_spans = torch.stack([spans.row, spans.student_start, spans.student_end], dim=1)
        return AlignedSampledTargets(student_spans.to(student.rows.device), totals.to(student.rows.device))

    def _rendered_answers(self, inputs: dict) -> tuple[dict, AlignedSpans]:
        if self.answers is None:
            raise ValueError("on-policy steps across tokenizers need the rows' prompt messages (an AnswerAligner)")
        return rendered_answers(self.answers, inputs, self.teacher_tokenizer.pad_token_id)

    def diagnostics(self, trainer, dataset, report) -> dict:
        """The share of answer tokens at aligned boundaries (all rows) and the teacher's probability on mapped
        tokens there (the first batch)."""
        batch = {key: value.to(trainer.args.device) for key, value in next(iter(trainer.get_train_dataloader())).items()}
        rows, weight = rows_at(self.teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"],
                               batch["aligned_row"], batch["aligned_teacher"])
        mass = teacher_mapped_mass(logit_rows(rows, weight), self.vocab_map)
        aligned = sum(len(positions) for positions in dataset["aligned_student"])
        return _coverage(aligned, report.answer_tokens, mass, "")

    def evaluate(self, trainer, dataset) -> dict:
        metrics = super().evaluate(trainer, dataset)
        batches = aligned_batches(dataset, trainer.eval_collator, trainer.args.per_device_eval_batch_size)
        metrics.update(evaluate_aligned(trainer.model, self.teacher, batches, self.vocab_map,
                                        trainer.loss_settings.chunk_size))
        return metrics


class AlignedCachedTeacher(TeacherSignal):
    """A cache captured across tokenizers (``cache-teacher --cross_tokenizer``): per row the student positions of
    its aligned boundaries and the teacher's top-k there, in its own ids; no teacher or teacher tokenizer loads."""

    def __init__(self, cache: TeacherCache, vocab_map: VocabularyMap, mode: CrossVocabMode, padding_side: str = "right"):
        self.cache, self.vocab_map, self.mode, self.padding_side = cache, vocab_map, mode, padding_side

    @classmethod
    def chosen(cls, config) -> bool:
        return config.training.teacher_cache is not None and config.training.cross_tokenizer is not None

    @classmethod
    def open_cache(cls, config, tokenizer, dataset, data: dict) -> TeacherCache:
        return open_teacher_cache(config, tokenizer, dataset, data)

    @classmethod
    def build(cls, config, parts: SourceParts) -> TeacherSignal:
        models = parts.models
        vocab_map = cached_vocabulary_map(parts.cache, models.tokenizer, models.student)
        return cls(parts.cache, vocab_map, cross_vocab_mode(config.training.cross_tokenizer),
                   models.tokenizer.padding_side)

    def attach(self, teacher, device) -> None:
        self.vocab_map = self.vocab_map.to(device)  # no teacher model: its rows come from the cache

    def targets(self, inputs: dict, student: StudentSide) -> TeacherTargets:
        rows, positions, topk = self._alignment(inputs)
        return AlignedTargets(rows, positions, from_topk(topk, self.vocab_map, self.mode), self.vocab_map)

    def _alignment(self, inputs) -> tuple[torch.Tensor, torch.Tensor, TopKRows]:
        """The batch's aligned boundaries as (row, student position) pairs in the padded batch, after checking that
        each is an answer position of its row, and the teacher's top-k there."""
        row_ids, answers = inputs["row_id"].tolist(), answer_mask(inputs["labels"])
        rows, positions, left = [], [], self.padding_side == "left"
        for index, (row, found) in enumerate(zip(row_ids, self.cache.student_positions(row_ids), strict=True)):
            shift = answers.shape[1] + 1 - int(inputs["attention_mask"][index].sum()) if left else 0
            found = found.to(answers.device) + shift
            if found.numel() and (int(found.max()) >= answers.shape[1] or not bool(answers[index, found].all())):
                raise DataError(f"teacher cache {self.cache.cache_dir}: the aligned boundaries it holds for training "
                                f"row {row} are not answer positions of that row: it was captured from other data")
            rows.append(torch.full_like(found, index))
            positions.append(found)
        return torch.cat(rows), torch.cat(positions), self.cache.rows(row_ids).to(answers.device)

    def diagnostics(self, trainer, dataset, report) -> dict:
        """As online, the teacher's mapped mass read from its cached top-k (a lower bound)."""
        top = self.cache.rows(next(iter(trainer.get_train_dataloader()))["row_id"].tolist())
        mapped = self.vocab_map.student_of_teacher.cpu()[top.token_ids] >= 0
        mass = (top.log_probs.exp() * mapped).sum(1)
        aligned = self.cache.manifest["fingerprint"]["cross_tokenizer"]["aligned_rows"]
        return _coverage(aligned, report.answer_tokens, mass, ", cached top-k")

    def identity(self) -> dict:
        return _cache_identity(self.cache)


class ServedTeacher(TeacherSignal):
    """A teacher served by vLLM on the student's own tokens: the top-k of each answer token, as the cache holds
    them. The collator asks the server for a batch's rows as soon as the batch is collated (the data loader runs
    one batch, and the Trainer one optimizer step, ahead), so the requests are answered while the student computes;
    ``targets`` waits only for what has not arrived (logged as ``teacher_wait_s``). In an on-policy run
    (``deferred``) collated rows wait until the trainer says whether their step trains on them (``planned``): rows
    an on-policy step replaces by the student's answers are never asked for."""

    requests_in_flight = 8  # rows asked for at once: enough to keep a server busy a step ahead of the student

    def __init__(self, server: TeacherServer, fingerprint: dict, top_k: int, kd_vocab_size: int, dataset,
                 deferred: bool = False):
        self.server, self.fingerprint, self.top_k, self.kd_vocab_size = server, fingerprint, top_k, kd_vocab_size
        self.dataset = dataset  # the training rows by row_id, for a batch that was not fetched ahead (packing)
        self.pool = ThreadPoolExecutor(self.requests_in_flight, thread_name_prefix="teacher-server")
        self.pending: dict[int, deque[Future]] = defaultdict(deque)
        self.deferred = deferred
        self.waiting: deque[dict] = deque()  # deferred: collated rows not asked for yet, in collation order
        self.waited, self.steps_waited = 0.0, 0
        self.rows: set[int] | None = None  # column routing: the training rows this teacher scores (None: all)

    @classmethod
    def chosen(cls, config) -> bool:
        return config.training.teacher_server is not None

    @classmethod
    def connect(cls, config, tokenizer) -> tuple[TeacherServer, dict]:
        """Before any model loads: the server answers, serves the student's tokenizer and returns
        --teacher_top_k log-probabilities; with its fingerprint."""
        server, fingerprint = TeacherServer.open(ServerSettings.from_config(config.training), tokenizer,
                                                 config.training.teacher_top_k, "--teacher_top_k")
        logger.info("teacher server %s: %s, top-%d per answer token; the teacher is not loaded",
                    config.training.teacher_server, server.model, config.training.teacher_top_k)
        return server, fingerprint

    @classmethod
    def build(cls, config, parts: SourceParts) -> TeacherSignal:
        models = parts.models
        vocab = min(len(models.tokenizer), output_rows(models.student))
        return cls(*parts.connection, config.training.teacher_top_k, vocab, parts.dataset,
                   deferred=config.training.on_policy_fraction > 0)

    def collator(self, padded, tokenizer):
        return _FetchingCollator(padded, self)

    def fetch(self, feature: dict) -> None:
        """Ask the server for one training row's targets now (a feature of the training data, with its row_id)."""
        self.pending[int(feature["row_id"])].append(
            self.pool.submit(self.server.row_topk, feature, self.top_k, self.kd_vocab_size))

    def score_only(self, rows: set[int]) -> None:
        self.rows = rows

    def collated(self, feature: dict) -> None:
        """A training row was collated: ask for it now, or (deferred) once its step is known to read it."""
        if self.rows is not None and int(feature["row_id"]) not in self.rows:
            return  # column routing gives it to another teacher
        if self.deferred:
            self.waiting.append(feature)
        else:
            self.fetch(feature)

    def planned(self, rows: list[int], on_policy: bool, next_on_policy: bool) -> None:
        step = Counter(rows)
        for feature in list(self.waiting):  # this step's rows come first; what follows was collated ahead
            row = int(feature["row_id"])
            reads = (not on_policy) if step[row] > 0 else (not next_on_policy)
            step[row] -= 1
            if reads:
                self.fetch(feature)
        self.waiting.clear()

    def targets(self, inputs: dict, student: StudentSide) -> TeacherTargets:
        row_ids, counts = inputs["row_id"].tolist(), _answer_tokens_per_row(inputs)
        if ROLLOUT in inputs:  # the student's own answers (their rows were never asked for: ``planned``)
            for b, row in enumerate(row_ids):
                self.fetch(_batch_row(inputs, b, row))
        for row in row_ids:
            if not self.pending.get(row):  # not fetched ahead
                self.fetch(self.dataset[row])
        start = time.perf_counter()
        try:
            rows = [self._take(row).result() for row in row_ids]
        finally:
            self.waited += time.perf_counter() - start
        for row, found, count in zip(row_ids, rows, counts, strict=True):
            if len(found) != count:
                raise TeacherServerError(f"teacher server {self.server.settings.url} returned {len(found)} answer "
                                         f"positions for training row {row}, the batch has {count}")
        device = inputs["labels"].device
        return TokenTargets(TopK(_concatenated(rows).to(device), torch.cat([row.token_log_probs for row in rows]).to(device)))

    def _take(self, row: int) -> Future:
        queue = self.pending[row]
        future = queue.popleft()
        if not queue:
            del self.pending[row]
        return future

    def log_figures(self, steps: int) -> dict:
        figures = {"teacher_wait_s": round(self.waited / max(steps, 1), 4)}
        self.waited = 0.0
        return figures

    def at_checkpoint(self) -> None:
        """The served model must be the one the run started with: checked before a checkpoint is marked complete."""
        now = {**self.fingerprint, "probe": self.server.probe_log_probs()}
        if not same_probe(self.fingerprint, now):
            raise TeacherServerError(f"teacher server {self.server.settings.url} now serves another model than the "
                                     f"one this run started with ({self.server.model}: its log-probabilities of the "
                                     "probe changed); serve the run's teacher again and resume")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def identity(self) -> dict:
        return {"served_teacher": self.fingerprint, "teacher_top_k": self.top_k}


class _FetchingCollator:
    """The training collator of a served teacher: collates, and asks the server for the batch's rows."""

    def __init__(self, collator, source: ServedTeacher):
        self.collator, self.source = collator, source

    def __call__(self, features: list[dict]) -> dict:
        for feature in features:
            if "row_id" in feature:  # training rows; held-out rows are scored by the student alone
                self.source.collated(feature)
        return self.collator(features)


def _batch_row(inputs: dict, b: int, row: int) -> dict:
    """Row ``b`` of a padded batch as a feature (its real tokens and labels)."""
    real = inputs["attention_mask"][b].bool()
    return {"input_ids": inputs["input_ids"][b][real].tolist(), "labels": inputs["labels"][b][real].tolist(),
            "row_id": row}


def _concatenated(rows: list[TopKRows]) -> TopKRows:
    return TopKRows(*(torch.cat([getattr(row, name) for row in rows]) for name in ("token_ids", "log_probs", "log_tail")))


def _answer_tokens_per_row(inputs) -> list[int]:
    answers = answer_mask(inputs["labels"])
    if "position_ids" not in inputs:
        return answers.sum(1).tolist()
    row = packed_row_index(inputs["position_ids"])[:-1]  # the row each prediction belongs to
    return torch.bincount(row[answers[0]], minlength=len(inputs["row_id"])).tolist()


def cached_vocabulary_map(cache: TeacherCache, tokenizer, student) -> VocabularyMap:
    """The vocabulary map a cache across tokenizers was captured with, checked against this student."""
    vocab_map = cache.vocabulary_map()
    student_size = min(len(tokenizer), output_rows(student))
    if vocab_map.student_size != student_size:
        raise VocabularyError(f"teacher cache {cache.cache_dir} was captured for a student of "
                              f"{vocab_map.student_size} ids, this student has {student_size}")
    return vocab_map


def cross_vocabulary_map(config, models: RunModels) -> VocabularyMap:
    """The map between the two vocabularies: the one saved in the run directory, or built now and saved there."""
    run_dir = config.training.output_dir
    teacher, student = models.teacher, models.student
    sizes = (min(len(models.teacher_tokenizer), output_rows(teacher)), min(len(models.tokenizer), output_rows(student)))
    saved = load_vocabulary_map(run_dir) if config.training.resume_from_checkpoint else None
    if saved is not None and (saved.teacher_size, saved.student_size) == sizes:
        return saved
    vocab_map = build_vocabulary_map(models.teacher_tokenizer, models.tokenizer, output_rows(teacher),
                                     output_rows(student))
    if config.training.process_index == 0:
        vocab_map.save(run_dir)
    logger.info("vocabulary map: %d of the student's %d ids have a teacher id with the same bytes (teacher %d ids)",
                len(vocab_map), vocab_map.student_size, vocab_map.teacher_size)
    return vocab_map


def _cache_identity(cache: TeacherCache) -> dict:
    """The cache's contents, by its shards' checksums: a cache captured again under the same path is another one."""
    shards = json.dumps([shard["sha256"] for shard in cache.manifest["shards"]]).encode()
    return {"teacher_cache_sha256": hashlib.sha256(shards).hexdigest()}


def _coverage(aligned: int, answer_tokens: int, mass: torch.Tensor, source: str) -> dict:
    """What the KD term across tokenizers sees, logged before training."""
    mass = mass.mean().item() if mass.numel() else float("nan")
    coverage = {"aligned_coverage": round(aligned / max(answer_tokens, 1), 6), "teacher_mapped_mass": round(mass, 6)}
    logger.info("across tokenizers: %d of %d student answer tokens (%.1f%%) are at aligned boundaries; the teacher "
                "puts %.1f%% of its probability on mapped tokens (first batch%s)", aligned, answer_tokens,
                100 * coverage["aligned_coverage"], 100 * mass, source)
    return coverage
