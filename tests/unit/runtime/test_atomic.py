"""runtime/atomic.py: a kill while writing leaves the old content or the new, never a mix."""

from __future__ import annotations

import os

import pytest

from llmneo.runtime.atomic import write_atomically


def test_the_new_content_replaces_the_old_and_no_temporary_is_left(tmp_path):
    path = tmp_path / "state.json"
    write_atomically(path, b"old")
    write_atomically(path, b"new")
    assert path.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["state.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    write_atomically(path, b"old")

    def broken_replace(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, b"new")
    assert path.read_bytes() == b"old"
