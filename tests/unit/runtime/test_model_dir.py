"""Model directories written whole or not at all (runtime/model_dir.py), and half-written ones named when read."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from llmneo.errors import ConfigError
from llmneo.runtime.model_dir import check_model_files, model_directory, partial_sibling, safetensors_problem


def test_the_directory_appears_only_when_the_block_finishes(tmp_path):
    output = tmp_path / "model"
    with model_directory(output) as partial:
        (partial / "config.json").write_text("{}")
        assert partial.parent == tmp_path and partial.name.startswith(".model.partial-") and not output.exists()
    assert (output / "config.json").read_text() == "{}"
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_a_failed_write_leaves_nothing(tmp_path):
    output = tmp_path / "model"
    with pytest.raises(RuntimeError), model_directory(output) as partial:
        (partial / "config.json").write_text("{}")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_output_directory_is_replaced_and_a_full_one_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with model_directory(tmp_path / "empty") as partial:
        (partial / "a").write_text("x")
    assert (tmp_path / "empty" / "a").is_file()
    with pytest.raises(ConfigError, match="already exists and is not empty"), model_directory(tmp_path / "empty"):
        pass


def test_a_dead_writers_leftover_is_named_and_removed(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = partial_sibling(tmp_path / "model", int(dead.stdout))
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    with caplog.at_level(logging.WARNING), model_directory(tmp_path / "model") as partial:
        (partial / "b").write_text("y")
    assert not leftover.exists() and str(leftover) in caplog.text and "unfinished write" in caplog.text
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_a_live_writers_directory_is_refused(tmp_path):
    live = partial_sibling(tmp_path / "model", os.getppid())
    live.mkdir()
    with pytest.raises(ConfigError, match=f"being written by process {os.getppid()}"), model_directory(tmp_path / "model"):
        pass
    assert live.is_dir() and not (tmp_path / "model").exists()


def weights(path, tensors=None):
    save_file(tensors or {"a": torch.arange(6.0), "b": torch.ones(2, 3)}, path)
    return path


def test_safetensors_sizes_against_their_header(tmp_path):
    path = weights(tmp_path / "w.safetensors")
    assert safetensors_problem(path) is None
    size = path.stat().st_size
    os.truncate(path, size - 5)
    assert safetensors_problem(path) == f"{size - 5} bytes where its header describes {size}"
    os.truncate(path, 20)
    assert "shorter than its" in safetensors_problem(path)
    os.truncate(path, 3)
    assert safetensors_problem(path) == "3 bytes, shorter than a header"


def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    weights(folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("damage, named", [
    (lambda d: (d / "tokenizer.json").unlink(), "config.json but no tokenizer files"),
    (lambda d: (d / "model.safetensors").unlink(), "config.json but no weights (model.safetensors)"),
    (lambda d: os.truncate(d / "model.safetensors", 40), "model.safetensors is broken"),
    (lambda d: (d / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'),
     "model-00001-of-00002.safetensors is missing (listed in model.safetensors.index.json)"),
])
def test_a_half_written_model_directory_is_named_in_one_line(tmp_path, damage, named):
    folder = model_dir(tmp_path)
    check_model_files(str(folder), "student")  # whole
    damage(folder)
    with pytest.raises(ConfigError) as raised:
        check_model_files(str(folder), "student")
    message = str(raised.value)
    assert "\n" not in message and named in message and "looks like an interrupted write" in message
    assert message.startswith(f"student model {folder}: ")


def test_directories_without_config_are_not_model_directories(tmp_path):
    (tmp_path / "adapter").mkdir()
    check_model_files(str(tmp_path / "adapter"), "adapter")  # adapters, runs and hub ids are checked elsewhere
    check_model_files("org/name", "teacher")


def test_a_live_writer_of_another_user_is_refused(tmp_path, monkeypatch):
    """A process the signal check may not touch (another user's: PermissionError) is alive, so its write is
    refused, not removed."""
    other = 4_000_000  # a PID this test treats as another user's live process
    real_kill = os.kill

    def kill(pid, signal):
        if pid == other:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(pid, signal)

    monkeypatch.setattr(os, "kill", kill)
    live = partial_sibling(tmp_path / "model", other)
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"theirs")
    with pytest.raises(ConfigError, match=f"being written by process {other}"), model_directory(tmp_path / "model"):
        pass
    assert (live / "model.safetensors").read_bytes() == b"theirs"


def test_every_file_and_folder_is_flushed_before_the_rename(tmp_path, monkeypatch):
    """Durability order: each file's data, then its folder, are on disk before the directory is renamed into place;
    the parent folder (the rename itself) is flushed after."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        target = os.readlink(f"/proc/self/fd/{descriptor}")
        events.append(("fsync", os.path.relpath(target, tmp_path)))
        real_fsync(descriptor)

    def replace(source, destination):
        events.append(("rename", os.path.relpath(destination, tmp_path)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with model_directory(tmp_path / "model") as partial:
        (partial / "sub").mkdir()
        (partial / "model.safetensors").write_bytes(b"w" * 10)
        (partial / "sub" / "tokenizer.json").write_text("{}")
        hidden = partial.name
    rename = events.index(("rename", "model"))
    flushed = {path for kind, path in events[:rename] if kind == "fsync"}
    for inside in ("model.safetensors", "sub/tokenizer.json", "sub", "llmneo-checksums.json", ""):
        assert os.path.normpath(os.path.join(hidden, inside)) in flushed, inside
    assert ("fsync", ".") in events[rename + 1:]  # the parent, after the rename
