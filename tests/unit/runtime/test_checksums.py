"""Checksums of the directories llm-neo writes (runtime/checksums.py): recorded when a directory is finished,
every changed byte named by file and byte range, directories without a record read as they are."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from llmneo.errors import ConfigError
from llmneo.runtime import checksums
from llmneo.runtime.checksums import CHECKSUM_FILE, record_checksums, verify_checksums
from llmneo.runtime.model_dir import check_model_files, model_directory

BLOCK = 4096


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(checksums, "BLOCK_BYTES", BLOCK)
    monkeypatch.setattr(checksums, "_verified", set())


def written(tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(os.urandom(5 * BLOCK + 123))
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "sub").mkdir()
    (directory / "sub" / "empty.bin").write_bytes(b"")
    record_checksums(directory)
    return directory


def flip(path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def test_the_record_holds_each_files_size_and_block_hashes(tmp_path):
    directory = written(tmp_path)
    record = json.loads((directory / CHECKSUM_FILE).read_text())
    assert record["block_bytes"] == BLOCK and sorted(record["files"]) == ["config.json", "model.safetensors",
                                                                           "sub/empty.bin"]
    data = (directory / "model.safetensors").read_bytes()
    expected = [hashlib.sha256(data[start:start + BLOCK]).hexdigest() for start in range(0, len(data), BLOCK)]
    assert record["files"]["model.safetensors"] == {"size": len(data), "blocks": expected}
    assert record["files"]["sub/empty.bin"]["blocks"] == [hashlib.sha256(b"").hexdigest()]
    verify_checksums(directory, "student model")


@pytest.mark.parametrize("offset", [0, BLOCK - 1, BLOCK, 3 * BLOCK + 7, 5 * BLOCK + 122])
def test_a_flipped_byte_anywhere_is_named_with_its_block(tmp_path, offset):
    directory = written(tmp_path)
    flip(directory / "model.safetensors", offset)
    start = offset // BLOCK * BLOCK
    end = min(start + BLOCK, 5 * BLOCK + 123)
    with pytest.raises(ConfigError, match=rf"student model {directory}: model.safetensors does not match the checksum "
                                          rf"recorded when llm-neo wrote it \(bytes {start}-{end} differ"):
        verify_checksums(directory, "student model")


def test_size_changes_missing_files_and_a_broken_record_are_named(tmp_path):
    directory = written(tmp_path)
    with open(directory / "config.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(ConfigError, match=r"config.json does not match .*\(24 bytes where 23 were written\)"):
        verify_checksums(directory, "run model")
    (directory / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config.json does not match .*\(it is missing\)"):
        verify_checksums(directory, "run model")
    (directory / CHECKSUM_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match=f"{CHECKSUM_FILE} is not a checksum record"):
        verify_checksums(directory, "run model")


def test_a_directory_without_a_record_is_read_as_it_is(tmp_path):
    directory = written(tmp_path)
    (directory / CHECKSUM_FILE).unlink()
    flip(directory / "model.safetensors", 10)
    verify_checksums(directory, "student model")


def test_a_change_after_a_verification_is_seen_by_the_next(tmp_path):
    """The in-process memo is keyed by sizes and modification times: a rewrite in place is hashed again."""
    directory = written(tmp_path)
    verify_checksums(directory, "student model")
    path = directory / "model.safetensors"
    before = path.stat()
    flip(path, 2 * BLOCK)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    with pytest.raises(ConfigError, match=f"bytes {2 * BLOCK}-{3 * BLOCK} differ"):
        verify_checksums(directory, "student model")


def test_extra_files_are_not_checked(tmp_path):
    directory = written(tmp_path)
    (directory / "README.md").write_text("notes added later")
    verify_checksums(directory, "student model")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_directories_get_plain_permissions_and_a_record(tmp_path, umask):
    """Row 10: a file a library wrote with mode 0600 (a private temporary file renamed into place) gets what a plain
    write under the umask gives."""
    old = os.umask(umask)
    try:
        with model_directory(tmp_path / "out") as partial:
            (partial / "config.json").write_text("{}")
            (partial / "tokenizer.json").write_text("{}")
            (partial / "model.safetensors").write_bytes(b"x" * 100)
            os.chmod(partial / "model.safetensors", 0o600)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    for name in ("config.json", "tokenizer.json", "model.safetensors", CHECKSUM_FILE):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert sorted(json.loads((out / CHECKSUM_FILE).read_text())["files"]) == ["config.json", "model.safetensors",
                                                                               "tokenizer.json"]


def test_readers_of_model_directories_verify(tmp_path):
    directory = written(tmp_path)
    (directory / "tokenizer.json").write_text("{}")
    record_checksums(directory)
    flip(directory / "model.safetensors", 5)
    with pytest.raises(ConfigError, match="teacher model .*model.safetensors does not match the checksum"):
        check_model_files(str(directory), "teacher")
