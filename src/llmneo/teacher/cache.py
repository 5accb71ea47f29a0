"""The offline teacher cache on disk: manifest, fingerprint, integrity checks and memory-mapped reading.

A cache directory holds ``manifest.json`` and safetensors shards ``shard-00000.safetensors``, ... Each shard covers
a contiguous range of dataset rows and holds, for every answer position of those rows in order, the teacher's
top-k token ids (``token_ids``, uint16 when the vocabulary fits, else int32), their log-probabilities at T = 1
(``log_probs``, in the cache dtype) and the log of the remaining mass (``log_tail``, fp32), plus ``row_offsets``
(where each row's answer positions start). The manifest records what the cache was captured from (the
fingerprint), how (settings) and every complete shard with its sha256; it is rewritten atomically after each shard.

A cache across tokenizers (captured with --cross_tokenizer, for any of its modes) holds one cached row per aligned
boundary instead of per answer position, in the teacher's own ids, plus ``student_positions`` (the student position,
in the unpadded row, of each) and, beside the manifest, the ``vocabulary_map.safetensors`` it was captured with:
the run needs neither the teacher nor its tokenizer. Its fingerprint adds the teacher's tokenizer and template and
the aligned boundaries themselves.
"""

from __future__ import annotations

import hashlib
import json
import logging
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..data.tokenize import chat_template_text
from ..losses.vocab_map import VocabularyMap, load_vocabulary_map
from ..runtime.layout import CACHE_MANIFEST as MANIFEST, MAP_FILE
from ..runtime.atomic import write_atomically
from ..errors import ConfigError, VocabularyError
from ..models.identity import data_fingerprint, model_identity
from ..losses.topk import TopKRows

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    write_atomically(Path(cache_dir) / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))


def _part_path(cache_dir: Path, rank: int) -> Path:
    return Path(cache_dir) / f"manifest.part-{rank}.json"


def write_part(cache_dir: Path, rank: int, entries: list[dict]) -> None:
    """The shards one capture process has completed so far (merged into the manifest by the main process)."""
    write_atomically(_part_path(cache_dir, rank), (json.dumps(entries, indent=1) + "\n").encode("utf-8"))


def merge_parts(cache_dir: Path, manifest: dict) -> dict:
    """``manifest`` with the shards listed in the part files added, in shard order (not verified here)."""
    entries = {entry["file"]: entry for entry in manifest["shards"]}
    for part in sorted(Path(cache_dir).glob("manifest.part-*.json")):
        entries.update({entry["file"]: entry for entry in json.loads(part.read_text(encoding="utf-8"))})
    return {**manifest, "shards": [entries[name] for name in sorted(entries)]}


def remove_parts(cache_dir: Path) -> None:
    for part in Path(cache_dir).glob("manifest.part-*.json"):
        part.unlink()


# ---- fingerprint: what a cache was captured from -------------------------------------------------------------------

def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha256_text(text + json.dumps(tokenizer.all_special_tokens))


def run_fingerprint(config, tokenizer, dataset, data: dict | None = None) -> dict:
    """Everything the cached rows depend on apart from the teacher (added by the capture); ``data``: the rows'
    ``data_fingerprint`` when the caller has it already."""
    return {
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "chat_template_sha256": _sha256_text(tokenizer.chat_template or ""),
        "max_length": config.data.max_length,
        "data": data or data_fingerprint(dataset, config.data.dataset),
    }


def _template_option_sha256(option: str | None) -> str | None:
    """The --teacher_chat_template a capture or a run gives, by the text it names (None: the tokenizer's own)."""
    return _sha256_text(chat_template_text(option)) if option else None


def aligned_fingerprint(teacher_tokenizer, chat_template_option: str | None, dataset) -> dict:
    """What a cache across tokenizers depends on besides the student's rows: the teacher's tokenizer, the template
    it read the rows through (and the option that chose it), and the aligned boundaries themselves."""
    digest, aligned = hashlib.sha256(), 0
    for row in dataset.with_format("numpy").select_columns(["aligned_student", "aligned_teacher"]):
        digest.update(row["aligned_student"].astype("int32").tobytes() + b"|")
        digest.update(row["aligned_teacher"].astype("int32").tobytes() + b"|")
        aligned += len(row["aligned_student"])
    return {"teacher_tokenizer_sha256": tokenizer_sha256(teacher_tokenizer),
            "teacher_chat_template_sha256": _sha256_text(teacher_tokenizer.chat_template or ""),
            "teacher_chat_template_option_sha256": _template_option_sha256(chat_template_option),
            "aligned_rows": aligned,
            "alignment_sha256": digest.hexdigest()}


def check_cross_tokenizer(cache_dir: Path, manifest: dict, cross_tokenizer: str | None,
                          chat_template_option: str | None) -> None:
    """A cache across tokenizers serves --cross_tokenizer runs only (any mode), read through the same teacher
    template option; a one-tokenizer cache serves the others."""
    cached = manifest["fingerprint"].get("cross_tokenizer")
    where = f"teacher cache {cache_dir}"
    if cached is None and cross_tokenizer:
        raise ConfigError(f"{where} holds the teacher's distributions over the student's own tokens; --cross_tokenizer "
                          f"{cross_tokenizer} needs a cache captured with --cross_tokenizer (any mode)")
    if cached is not None and not cross_tokenizer:
        raise ConfigError(f"{where} was captured across tokenizers (the teacher's own ids at aligned boundaries): "
                          "add --cross_tokenizer exact (or uld, hybrid)")
    if cached is not None:
        if _template_option_sha256(chat_template_option) != cached["teacher_chat_template_option_sha256"]:
            raise ConfigError(f"{where} was captured with another --teacher_chat_template than this run's "
                              f"({chat_template_option or 'none'}): give the one the cache was captured with")


def check_fingerprint(cache_dir: Path, manifest: dict, current: dict, teacher: dict | None) -> None:
    """A clear error for each way the cache does not belong to this run."""
    cached = manifest["fingerprint"]
    where = f"teacher cache {cache_dir}"
    if current["tokenizer_sha256"] != cached["tokenizer_sha256"]:
        raise ConfigError(f"{where} was captured with another tokenizer than this run's student tokenizer")
    if current["chat_template_sha256"] != cached["chat_template_sha256"]:
        raise ConfigError(f"{where} was captured with another chat template than this run's")
    if current["max_length"] != cached["max_length"]:
        raise ConfigError(f"{where} was captured with max_length={cached['max_length']}, this run uses "
                          f"max_length={current['max_length']}")
    if current["data"]["sha256"] != cached["data"]["sha256"]:
        now, then = current["data"], cached["data"]
        raise ConfigError(
            f"{where} was captured from other training data: {then['rows']} rows / {then['answer_tokens']} answer "
            f"tokens of {then['dataset']}, this run has {now['rows']} rows / {now['answer_tokens']} answer tokens of "
            f"{now['dataset']} (dataset, format, max_samples, seed and skip_bad_rows must match the capture)")
    if teacher is not None and teacher != cached["teacher"]:
        raise ConfigError(f"{where} was captured from teacher {cached['teacher']['path']}, this run names "
                          f"{teacher['path']} (a different model or different weights)")


# ---- reading ---------------------------------------------------------------------------------------------------------

@dataclass
class _Shard:
    first_row: int
    offsets: list[int]
    handle: object


class TeacherCache:
    """A complete, verified cache: ``rows(row_ids)`` gives their cached answer positions, read from memory-mapped
    shards."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        manifest = read_manifest(self.cache_dir)
        if manifest is None:
            raise ConfigError(f"teacher cache {self.cache_dir} has no {MANIFEST}: run `llm-neo cache-teacher` first")
        if manifest.get("version") != FORMAT_VERSION:
            raise ConfigError(f"teacher cache {self.cache_dir} has format version {manifest.get('version')}, "
                              f"this llm-neo reads version {FORMAT_VERSION}")
        listed = sum(shard["rows"] for shard in manifest["shards"])
        if not manifest.get("complete") or listed != manifest["fingerprint"]["data"]["rows"]:
            done = sum(shard["rows"] for shard in merge_parts(self.cache_dir, manifest)["shards"])
            raise ConfigError(f"teacher cache {self.cache_dir} is incomplete ({done} of "
                              f"{manifest['fingerprint']['data']['rows']} rows): re-run the same "
                              "`llm-neo cache-teacher` command to finish it")
        self.manifest = manifest
        self.shards = [self._open(entry) for entry in manifest["shards"]]
        self._starts = [shard.first_row for shard in self.shards]

    def _open(self, entry: dict) -> _Shard:
        path = self.cache_dir / entry["file"]
        if not path.is_file():
            raise ConfigError(f"teacher cache {self.cache_dir}: shard {entry['file']} is missing")
        if sha256_file(path) != entry["sha256"]:
            raise ConfigError(f"teacher cache {self.cache_dir}: shard {entry['file']} is corrupted (its sha256 does "
                              "not match the manifest); delete it and re-run `llm-neo cache-teacher` to rewrite it")
        handle = safe_open(str(path), framework="pt")
        return _Shard(entry["first_row"], handle.get_tensor("row_offsets").tolist(), handle)

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    @property
    def across_tokenizers(self) -> bool:
        """Captured with --cross_tokenizer: rows at aligned boundaries, in the teacher's own ids."""
        return "cross_tokenizer" in self.manifest["fingerprint"]

    def vocabulary_map(self) -> VocabularyMap:
        """The map between the teacher's ids and the student's that a cache across tokenizers was captured with."""
        vocab_map = load_vocabulary_map(self.cache_dir)
        if vocab_map is None:
            raise ConfigError(f"teacher cache {self.cache_dir} was captured across tokenizers but its {MAP_FILE} is "
                              "missing: capture it again")
        return vocab_map

    def _span(self, row: int) -> tuple[_Shard, int, int]:
        """The shard holding a dataset row and the range of its cached rows there."""
        shard = self.shards[bisect_right(self._starts, row) - 1]
        return shard, shard.offsets[row - shard.first_row], shard.offsets[row - shard.first_row + 1]

    def student_positions(self, row_ids) -> list[torch.Tensor]:
        """Per row of a cache across tokenizers: the student positions (in the unpadded row) its cached rows are at."""
        positions = []
        for row in row_ids:
            shard, start, end = self._span(int(row))
            positions.append(shard.handle.get_slice("student_positions")[start:end].long())
        return positions

    def row_answer_tokens(self, row: int) -> int:
        _, start, end = self._span(row)
        return end - start

    def rows(self, row_ids) -> TopKRows:
        parts = {"token_ids": [], "log_probs": [], "log_tail": []}
        for row in row_ids:
            shard, start, end = self._span(int(row))
            for name, part in parts.items():
                part.append(shard.handle.get_slice(name)[start:end])
        return TopKRows(torch.cat(parts["token_ids"]).to(torch.int64), torch.cat(parts["log_probs"]).float(),
                        torch.cat(parts["log_tail"]).float())


def open_teacher_cache(config, tokenizer, dataset, data: dict | None = None) -> TeacherCache:
    """The run's teacher cache, verified (every shard's checksum) and matched against this run before training
    (``data``: the rows' ``data_fingerprint``, if already computed)."""
    cache = TeacherCache(config.training.teacher_cache)
    teacher = model_identity(config.model.teacher_model) if config.model.teacher_model else None
    check_cross_tokenizer(cache.cache_dir, cache.manifest, config.training.cross_tokenizer,
                          config.model.teacher_chat_template)
    check_fingerprint(cache.cache_dir, cache.manifest, run_fingerprint(config, tokenizer, dataset, data), teacher)
    logger.info("teacher cache %s: top-%d, %s tail, %d rows; the teacher is not loaded", cache.cache_dir,
                cache.settings["top_k"], config.training.cache_tail, len(dataset))
    return cache


def cached_vocab_size(cache: TeacherCache, student_vocab: int) -> int:
    """The vocabulary the cache was captured over, which the student's output layer must cover."""
    vocab = cache.settings["kd_vocab_size"]
    if student_vocab < vocab:
        raise VocabularyError(f"the student's output layer covers {student_vocab} ids, fewer than the {vocab} the "
                              "teacher cache was captured over")
    return vocab
