"""An exclusive lock on a run (or cache) directory for as long as a process writes into it.

``fcntl.flock`` locks belong to the open file: the kernel releases them when the process dies, however it dies,
so a lock left by a killed process never blocks a resume. The lock file records the holder (pid, host, start) so
that a second process can say who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import ConfigError
from .layout import LOCK_FILE



class DirectoryLock:
    """``with DirectoryLock(path, "distill"):`` holds ``path/.llmneo.lock`` exclusively, or fails at once."""

    def __init__(self, directory: str | Path, command: str):
        self.path, self.command, self.handle = Path(directory) / LOCK_FILE, command, None
        self.created = False  # whether this lock made the directory (removed again if nothing else was written)

    def __enter__(self) -> DirectoryLock:
        self.created = not self.path.parent.exists()
        writable_directory(self.path.parent)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until __exit__
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise ConfigError(f"{self.path.parent} is in use by another llm-neo process ({_describe(holder)}): wait "
                              "for it to finish, or use another directory") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is None:
            return
        # A command refused before it wrote anything leaves no trace: no lone lock file, no directory it made.
        if [item.name for item in self.path.parent.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            if self.created:
                self.path.parent.rmdir()
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
    except json.JSONDecodeError:
        return "holder unknown"
    return f"{info.get('command', 'llm-neo')} with pid {info.get('pid')} on host {info.get('host')}, since {info.get('since')}"


def writable_directory(directory: Path) -> None:
    """Create ``directory`` if needed; a path that is a file, or a directory this process cannot write, is named."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create {directory}: {error.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"{directory} is not writable by this user")
