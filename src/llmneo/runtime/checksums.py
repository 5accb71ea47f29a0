"""Checksums of the files of a directory llm-neo wrote (a merged, pruned or imported model, an adapter, a run's
weights): recorded when the directory is finished, verified when it is read.

A weight file damaged after it was written (a bad copy, storage that flipped or zeroed a block) keeps its size and
its safetensors header, so nothing else notices: the model loads and answers nonsense. Every file is hashed in
blocks of ``BLOCK_BYTES`` with SHA-256 (blocks in parallel, one thread per core: hashlib releases the GIL), so a
reader names the file and the byte range that differ. Directories without ``CHECKSUM_FILE`` (written by another
tool, or an older llm-neo) are read as they are. A directory verified once is not hashed again by the same process
while its files keep their sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import ConfigError

CHECKSUM_FILE = "llmneo-checksums.json"
BLOCK_BYTES = 64 * 2**20
_verified: set[tuple] = set()  # (directory, its files' names, sizes and mtimes) verified in this process


def record_checksums(directory: str | Path) -> None:
    """Write ``CHECKSUM_FILE`` listing every file below ``directory`` with its size and block hashes."""
    directory = Path(directory)
    files = sorted(path for path in directory.rglob("*") if path.is_file() and path.name != CHECKSUM_FILE)
    hashes = _block_hashes(files, BLOCK_BYTES)
    record = {"algorithm": "sha256", "block_bytes": BLOCK_BYTES,
              "files": {path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "blocks": blocks}
                        for path, blocks in zip(files, hashes, strict=True)}}
    (directory / CHECKSUM_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def verify_checksums(directory: str | Path, role: str) -> None:
    """Every file ``CHECKSUM_FILE`` lists must be there with its recorded size and blocks; the first that is not
    is named in one line (``role``: what the directory is to the command, e.g. "student model")."""
    directory = Path(directory)
    path = directory / CHECKSUM_FILE
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        listed, block = record["files"], int(record["block_bytes"])
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{role} {directory}: {CHECKSUM_FILE} is not a checksum record ({error}): write the "
                          "directory again, or remove that file to read it unchecked") from None
    files = [directory / name for name in listed]
    for name, file in zip(listed, files, strict=True):
        if not file.is_file():
            raise _changed(role, directory, name, "it is missing")
        if file.stat().st_size != listed[name]["size"]:
            raise _changed(role, directory, name, f"{file.stat().st_size} bytes where {listed[name]['size']} were "
                                                  "written")
    key = (str(directory.resolve()), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key in _verified:
        return
    for name, blocks in zip(listed, _block_hashes(files, block), strict=True):
        for index, (found, written) in enumerate(zip(blocks, listed[name]["blocks"], strict=True)):
            if found != written:
                start = index * block
                end = min(start + block, listed[name]["size"])
                raise _changed(role, directory, name, f"bytes {start}-{end} differ from what was written")
    _verified.add(key)


def _changed(role: str, directory: Path, name: str, what: str) -> ConfigError:
    return ConfigError(f"{role} {directory}: {name} does not match the checksum recorded when llm-neo wrote it "
                       f"({what}): the file was changed or damaged after it was written (storage fault, a bad or "
                       "partial copy); copy or write it again")


def _block_hashes(files: list[Path], block: int) -> list[list[str]]:
    """The SHA-256 of each ``block``-byte block of each file, hashed in parallel."""
    jobs = [(path, start) for path in files for start in range(0, max(path.stat().st_size, 1), block)]
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = iter(pool.map(lambda job: _hash_block(*job, block), jobs))
    return [[next(digests) for _ in range(0, max(path.stat().st_size, 1), block)] for path in files]


def _hash_block(path: Path, start: int, block: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        handle.seek(start)
        remaining = block
        while remaining:
            chunk = handle.read(min(remaining, 8 * 2**20))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()
