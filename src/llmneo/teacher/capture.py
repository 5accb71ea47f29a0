"""`llm-neo cache-teacher`: run the teacher once over the training data and store its top-k answer distributions.

The data is tokenised exactly as `llm-neo distill` will (same config, same student tokenizer and template), so
row i of the cache is row i of training. Shards are written atomically and listed in the manifest with their
sha256 as they complete; re-running the same command after a kill continues from the first missing shard.
"""

from __future__ import annotations

import hashlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import AutoConfig

from ..data.collators import AlignedCollator, make_collator
from ..data.loading import TeacherSide, build_datasets
from ..data.vocabulary import build_vocabulary_map
from ..errors import ConfigError
from ..losses.contract import answer_mask, answer_row_index
from ..lm_head import output_rows
from ..losses.cross_vocab import logit_rows
from ..models.loading import check_quantization, load_reading_tokenizer, load_student_tokenizer, load_tokenizer
from ..models.vocabulary_check import check_vocabularies
from ..models.identity import model_identity
from ..runtime.atomic import write_atomically
from ..runtime.identity import same_teacher
from ..runtime.lock import DirectoryLock
from ..runtime.nonfinite import check_finite_rows
from ..runtime.processes import check_processes
from .cache import (CACHE_DTYPES, FORMAT_VERSION, aligned_fingerprint, merge_parts, read_manifest, remove_parts,
                    run_fingerprint, sha256_file, shard_name, write_manifest, write_part)
from .loading import load_teacher
from .server import ServerSettings, TeacherServer
from .online import answer_logit_chunks, rows_at

logger = logging.getLogger(__name__)


@dataclass
class CaptureSettings:
    top_k: int = 64  # teacher tokens kept per answer position
    cache_dtype: str = "float16"  # storage dtype of the log-probabilities
    shard_rows: int = 1024  # dataset rows per shard (the unit of resumption)
    batch_size: int = 8  # rows per teacher forward pass
    chunk_rows: int = 1024  # answer positions per logits chunk (bounds the V-wide buffers): the run's --kd_chunk_size


@dataclass
class CaptureJob:
    """What a capture reads: the teacher (a model, or a TeacherServer), the tokenized rows, their collator (None for
    a server), the settings and the vocabulary the top-k is taken over."""

    teacher: object
    dataset: object
    collator: object
    settings: CaptureSettings
    vocab: int


def cache_teacher(config, cache_dir: str | Path, settings: CaptureSettings, concurrency: int = 8) -> dict:
    """`llm-neo cache-teacher`: the teacher's top-k over the data exactly as `distill` tokenises it; returns the
    manifest. ``concurrency``: requests in flight to a --teacher_server."""
    check_processes(PartialState().num_processes)
    check_quantization(config.model)
    if config.data.task == "classification":
        raise ConfigError("cache-teacher is for --task causal_lm: a classification teacher's few class logits are "
                          "computed online")
    tokenizer = load_student_tokenizer(config.model)
    if config.training.teacher_server is not None:
        if concurrency < 1:
            raise ConfigError(f"--teacher_server_concurrency must be >= 1, got {concurrency}")
        served = TeacherServer.open(ServerSettings.from_config(config.training), tokenizer, settings.top_k, "--top_k")
    with DirectoryLock(cache_dir, "llm-neo cache-teacher") if PartialState().is_main_process else nullcontext():
        if config.training.teacher_server is not None:
            return capture_served_cache(config, cache_dir, settings, tokenizer, served, concurrency)
        if config.training.cross_tokenizer:
            return capture_aligned_cache(config, cache_dir, settings, tokenizer)
        return capture_teacher_cache(config, cache_dir, settings, tokenizer, make_collator(tokenizer))


def capture_teacher_cache(config, cache_dir: str | Path, settings: CaptureSettings, tokenizer, collator) -> dict:
    """Write (or finish) the cache of ``config``'s teacher over ``config``'s data; returns the manifest."""
    dataset, _, _ = build_datasets(config.data, tokenizer, config.training.seed)
    teacher = load_teacher(config.model)
    teacher_tokenizer = load_tokenizer(config.model.teacher_model, config.model.trust_remote_code, "teacher")
    student_size = AutoConfig.from_pretrained(config.model.student_model).vocab_size
    vocab = check_vocabularies(tokenizer, teacher_tokenizer, student_size, teacher)
    fingerprint = {**run_fingerprint(config, tokenizer, dataset),
                   "teacher": model_identity(config.model.teacher_model, teacher.config)}
    return write_cache(cache_dir, CaptureJob(teacher, dataset, collator, settings, vocab), fingerprint)


def capture_served_cache(config, cache_dir: str | Path, settings: CaptureSettings, tokenizer,
                         served: tuple[TeacherServer, dict], concurrency: int) -> dict:
    """The cache of a served teacher (--teacher_server): its top-k of every answer token, ``concurrency`` rows in
    flight, in the format and with the checks of a local capture; the served model's fingerprint is its teacher."""
    server, served_fingerprint = served  # TeacherServer.open's
    dataset, _, _ = build_datasets(config.data, tokenizer, config.training.seed)
    teacher = {"served_teacher": served_fingerprint}
    vocab = min(len(tokenizer), AutoConfig.from_pretrained(config.model.student_model).vocab_size)
    fingerprint = {**run_fingerprint(config, tokenizer, dataset), "teacher": teacher}
    return write_served_cache(cache_dir, CaptureJob(server, dataset, None, settings, vocab), fingerprint, concurrency)


def write_served_cache(cache_dir: str | Path, job: CaptureJob, fingerprint: dict, concurrency: int) -> dict:
    """``write_cache`` with a served teacher (``job.teacher``): ``concurrency`` rows in flight."""
    with ThreadPoolExecutor(concurrency, thread_name_prefix="teacher-server") as pool:
        return write_cache(cache_dir, job, fingerprint, partial(_served_capture_rows, pool))


def _served_capture_rows(pool, job: CaptureJob, rows: range, device) -> dict:
    """The served teacher's top-k of the answer tokens of ``rows``, requested in parallel, kept in row order."""
    server, dataset, settings, vocab = job.teacher, job.dataset, job.settings, job.vocab
    found = list(pool.map(lambda row: server.row_topk({**dataset[row], "row_id": row}, settings.top_k, vocab), rows))
    id_dtype = torch.uint16 if vocab <= 65536 else torch.int32
    return {"token_ids": torch.cat([top.token_ids for top in found]).to(id_dtype),
            "log_probs": torch.cat([top.log_probs for top in found]).to(CACHE_DTYPES[settings.cache_dtype]),
            "log_tail": torch.cat([top.log_tail for top in found]),
            "row_offsets": torch.tensor([0, *(len(top) for top in found)], dtype=torch.int64).cumsum(0)}


def capture_aligned_cache(config, cache_dir: str | Path, settings: CaptureSettings, tokenizer) -> dict:
    """--cross_tokenizer: the teacher's top-k in its own ids at each aligned boundary, the student position each
    belongs to, and the vocabulary map, so that the run needs neither the teacher nor its tokenizer."""
    teacher_tokenizer = load_reading_tokenizer(config.model.teacher_model, config.model.trust_remote_code, "teacher",
                                               chat_template=config.model.teacher_chat_template)
    dataset, _, _ = build_datasets(config.data, tokenizer, config.training.seed, TeacherSide(teacher_tokenizer))
    teacher = load_teacher(config.model)
    student_size = AutoConfig.from_pretrained(config.model.student_model).vocab_size
    vocab_map = build_vocabulary_map(teacher_tokenizer, tokenizer, output_rows(teacher), student_size)
    fingerprint = {**run_fingerprint(config, tokenizer, dataset),
                   "teacher": model_identity(config.model.teacher_model, teacher.config),
                   "cross_tokenizer": aligned_fingerprint(teacher_tokenizer, config.model.teacher_chat_template,
                                                          dataset)}
    if PartialState().is_main_process:  # before any shard: a complete manifest always has its map beside it
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        vocab_map.save(cache_dir)
    collator = AlignedCollator(make_collator(tokenizer), tokenizer.padding_side, teacher_tokenizer.pad_token_id)
    return write_cache(cache_dir, CaptureJob(teacher, dataset, collator, settings, vocab_map.teacher_size), fingerprint,
                       _capture_aligned_rows)


def write_cache(cache_dir: str | Path, job: CaptureJob, fingerprint: dict, capture_rows=None) -> dict:
    """Capture ``job.teacher`` over the tokenized ``job.dataset`` into ``cache_dir``, resuming a capture of the same
    fingerprint and settings. Under several processes (accelerate launch, torchrun) shard i is captured by rank
    i mod world size; each rank lists its shards in its own part file and the main process writes the manifest.
    ``capture_rows``: the tensors of a range of rows (default: the top-k at every answer position)."""
    teacher, settings, vocab = job.teacher, job.settings, job.vocab
    if settings.top_k <= 0 or settings.shard_rows <= 0 or settings.batch_size <= 0:
        raise ConfigError("top_k, shard_rows and batch_size must be > 0")
    if settings.cache_dtype not in CACHE_DTYPES:
        raise ConfigError(f"unknown cache_dtype '{settings.cache_dtype}'; expected one of {sorted(CACHE_DTYPES)}")
    dtype = str(teacher.dtype).removeprefix("torch.") if isinstance(teacher, torch.nn.Module) else "served"
    stored = {**asdict(settings), "kd_vocab_size": vocab, "teacher_dtype": dtype,
              "id_dtype": "uint16" if vocab <= 65536 else "int32"}
    cache_dir, state = Path(cache_dir), PartialState()
    if state.is_main_process:
        _start_manifest(cache_dir, fingerprint, stored)
    state.wait_for_everyone()
    manifest = read_manifest(cache_dir)
    if isinstance(teacher, torch.nn.Module) and getattr(teacher, "hf_quantizer", None) is None:
        job = replace(job, teacher=teacher.to(state.device))
    _capture_shards(cache_dir, manifest, job, state, capture_rows or _capture_rows)
    state.wait_for_everyone()
    if state.is_main_process:
        _finish_manifest(cache_dir, manifest, math.ceil(len(job.dataset) / settings.shard_rows))
    state.wait_for_everyone()
    return read_manifest(cache_dir)


def _start_manifest(cache_dir: Path, fingerprint: dict, stored: dict) -> None:
    """A new manifest, or the existing one of an interrupted capture of exactly this run with its good shards."""
    manifest = read_manifest(cache_dir)
    if manifest is None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(cache_dir, {"version": FORMAT_VERSION, "complete": False, "fingerprint": fingerprint,
                                   "settings": stored, "shards": []})
        return
    for key, (old, new) in {"fingerprint": (manifest["fingerprint"], fingerprint),
                            "settings": (manifest["settings"], stored)}.items():
        changed = sorted(name for name in {*old, *new} if old.get(name) != new.get(name)
                         and not (name == "teacher" and same_teacher(old.get(name), new.get(name))))
        if changed:
            raise ConfigError(f"{cache_dir} holds a cache captured with other {key} ({', '.join(changed)} differ): "
                              "use another --cache_dir, or delete this one to start over")
    manifest["shards"] = _verified(cache_dir, merge_parts(cache_dir, manifest)["shards"])
    manifest["complete"] = False  # complete again only when _finish_manifest has every shard
    write_manifest(cache_dir, manifest)
    remove_parts(cache_dir)


def _verified(cache_dir: Path, shards: list[dict]) -> list[dict]:
    good = []
    for entry in shards:
        path = cache_dir / entry["file"]
        if path.is_file() and sha256_file(path) == entry["sha256"]:
            good.append(entry)
        else:
            logger.warning("shard %s is missing or damaged: capturing it again", entry["file"])
    return good


def _capture_shards(cache_dir, manifest, job: CaptureJob, state, capture_rows) -> None:
    settings = job.settings
    rows, done = len(job.dataset), {entry["file"] for entry in manifest["shards"]}
    mine = [index for index in range(math.ceil(rows / settings.shard_rows))
            if index % state.num_processes == state.process_index and shard_name(index) not in done]
    written = []
    with tqdm(total=len(mine), unit="shard", desc="teacher cache", dynamic_ncols=True,
              disable=not state.is_main_process) as bar:
        for index in mine:
            first = index * settings.shard_rows
            tensors = capture_rows(job, range(first, min(first + settings.shard_rows, rows)), state.device)
            written.append(_write_shard(cache_dir, index, first, tensors))
            write_part(cache_dir, state.process_index, written)
            bar.update(1)
            bar.set_postfix(tokens_per_shard=written[-1]["answer_tokens"],
                            bytes_per_token=f"{_bytes_per_token({'shards': written}):.1f}")


def _finish_manifest(cache_dir: Path, manifest: dict, shard_count: int) -> None:
    manifest = merge_parts(cache_dir, manifest)
    missing = sorted({shard_name(index) for index in range(shard_count)} - {e["file"] for e in manifest["shards"]})
    if missing:
        raise ConfigError(f"teacher cache {cache_dir}: shard(s) {', '.join(missing)} were not written")
    manifest["complete"] = True
    manifest["bytes_per_answer_token"] = round(_bytes_per_token(manifest), 3)
    write_manifest(cache_dir, manifest)
    remove_parts(cache_dir)
    unit = "aligned boundary" if "cross_tokenizer" in manifest["fingerprint"] else "answer token"
    logger.info("teacher cache complete in %s: %d shards, %d cached rows (one per %s), %.1f bytes per %s", cache_dir,
                len(manifest["shards"]), sum(entry["answer_tokens"] for entry in manifest["shards"]), unit,
                manifest["bytes_per_answer_token"], unit)


def _bytes_per_token(manifest: dict) -> float:
    shards = manifest["shards"]
    return sum(entry["bytes"] for entry in shards) / max(sum(entry["answer_tokens"] for entry in shards), 1)


@torch.no_grad()
def _capture_rows(job: CaptureJob, rows: range, device) -> dict:
    teacher, dataset, collator, settings, vocab = job.teacher, job.dataset, job.collator, job.settings, job.vocab
    parts, counts = {"token_ids": [], "log_probs": [], "log_tail": []}, []
    for start in range(rows.start, rows.stop, settings.batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + settings.batch_size, rows.stop))])
        batch = {key: value.to(device) for key, value in batch.items()}
        mask = answer_mask(batch["labels"])
        counts += mask.sum(1).tolist()
        row_of = (answer_row_index(mask) + start).split(settings.chunk_rows)  # the training row of each position
        for logits, row in zip(answer_logit_chunks(teacher, batch, mask, settings.chunk_rows, vocab), row_of,
                               strict=True):
            check_finite_rows(logits, row, "the teacher's logits on training rows")
            for name, value in _top_k(logits, settings, vocab).items():
                parts[name].append(value.cpu())
    offsets = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
    return {**{name: torch.cat(values) for name, values in parts.items()}, "row_offsets": offsets}


@torch.no_grad()
def _capture_aligned_rows(job: CaptureJob, rows: range, device) -> dict:
    """The teacher's top-k at the aligned boundaries of ``rows`` (the teacher reads its own tokens) and
    ``student_positions``, the student position of each, relative to its row."""
    teacher, dataset, collator, settings, vocab = job.teacher, job.dataset, job.collator, job.settings, job.vocab
    parts, positions = {"token_ids": [], "log_probs": [], "log_tail": []}, []
    for start in range(rows.start, rows.stop, settings.batch_size):
        features = [dataset[i] for i in range(start, min(start + settings.batch_size, rows.stop))]
        batch = {key: value.to(device) for key, value in collator(features).items()}
        positions += [torch.tensor(feature["aligned_student"], dtype=torch.int32) for feature in features]
        found, weight = rows_at(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"],
                                batch["aligned_row"], batch["aligned_teacher"])
        row_of = batch["aligned_row"] + start
        for first in range(0, found.shape[0], settings.chunk_rows):
            logits = logit_rows(found[first:first + settings.chunk_rows], weight)[:, :vocab].float()
            check_finite_rows(logits, row_of[first:first + settings.chunk_rows],
                              "the teacher's logits at aligned boundaries")
            for name, value in _top_k(logits, settings, vocab).items():
                parts[name].append(value.cpu())
    if not parts["token_ids"]:  # no aligned boundary in these rows: empty tensors of the right shapes
        for name, value in _top_k(torch.zeros((0, vocab)), settings, vocab).items():
            parts[name].append(value)
    counts = [len(row) for row in positions]
    return {**{name: torch.cat(values) for name, values in parts.items()}, "student_positions": torch.cat(positions),
            "row_offsets": torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)}


def _top_k(logits: torch.Tensor, settings: CaptureSettings, vocab: int) -> dict:
    log_probs = F.log_softmax(logits, dim=-1)
    top = log_probs.topk(min(settings.top_k, vocab), dim=-1)
    if settings.top_k >= vocab:
        log_tail = torch.full_like(top.values[:, 0], float("-inf"))
    else:  # log(1 - sum of the kept probabilities)
        log_tail = torch.log(-torch.expm1(torch.logsumexp(top.values, dim=-1).clamp(max=0.0)))
    id_dtype = torch.uint16 if vocab <= 65536 else torch.int32
    return {"token_ids": top.indices.to(id_dtype), "log_probs": top.values.to(CACHE_DTYPES[settings.cache_dtype]),
            "log_tail": log_tail}


def _write_shard(cache_dir: Path, index: int, first_row: int, tensors: dict) -> dict:
    rows = tensors["row_offsets"].numel() - 1
    # One metadata key: safetensors writes a mapping's keys in an order that varies between processes.
    data = safetensors.torch.save(tensors, metadata={"format": "pt"})
    write_atomically(cache_dir / shard_name(index), data)
    return {"file": shard_name(index), "first_row": first_row, "rows": rows,
            "answer_tokens": int(tensors["row_offsets"][-1]), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
