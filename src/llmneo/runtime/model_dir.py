"""Model and adapter directories written whole or not at all, and half-written ones named when read.

A writer (merge, export-lora, prune-layers, import-gguf) fills a hidden sibling ``.NAME.partial-PID`` on the same
filesystem, flushes every file and renames it into place last: a kill at any moment leaves no ``NAME`` or a complete
one. The next write of ``NAME`` removes a sibling its dead process left (saying so) and refuses one whose process
still runs. Every file of a finished directory has its checksum recorded (runtime/checksums.py), and the
permissions a plain write would give. A reader that finds a directory with config.json but no weights or tokenizer files, or weights shorter
than their header says (written by hand, by another tool, or by an older llm-neo), names the file in one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError
from .checksums import record_checksums, verify_checksums
from .run_dir import require_new_output

logger = logging.getLogger(__name__)

PARTIAL = ".partial-"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
INTERRUPTED = ("the directory looks like an interrupted write (merge, export-lora, prune-layers or import-gguf killed "
               "while writing it, or a copy that did not finish): write it again")


def partial_sibling(output: Path, pid: int) -> Path:
    return output.parent / f".{output.name}{PARTIAL}{pid}"


@contextlib.contextmanager
def model_directory(output: str | Path, option: str = "--output") -> Iterator[Path]:
    """The directory to write ``output``'s files into; renamed to ``output`` when the block ends without error."""
    output = Path(output)
    require_new_output(output, option)
    clear_leftovers(output)
    partial = partial_sibling(output, os.getpid())
    partial.mkdir(parents=True)
    try:
        yield partial
        seal_directory(partial)
        _flush_tree(partial)
        os.replace(partial, output)  # an empty output directory is replaced too
        _flush(output.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def clear_leftovers(output: Path) -> None:
    """Remove what a killed write of ``output`` left; refuse while another process is writing it."""
    for sibling in sorted(output.parent.glob(f".{output.name}{PARTIAL}*")):
        pid = sibling.name.rsplit(PARTIAL, 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and _running(int(pid)):
            raise ConfigError(f"{sibling} is being written by process {pid} (another write of {output}): wait for it "
                              f"to finish; if no such process of yours is running, remove {sibling}")
        logger.warning("removing %s: an unfinished write of %s whose process is gone", sibling, output)
        shutil.rmtree(sibling)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def seal_directory(directory: Path) -> None:
    """A written model or adapter directory made ordinary and checkable: the permissions a plain write under the
    user's umask gives (libraries write some files through private temporary files, mode 0600, which another user
    or a server running as another user cannot read), and the checksum of every file (runtime/checksums.py)."""
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, files in os.walk(directory):
        os.chmod(folder, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)
    record_checksums(directory)


def _flush_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        _flush(Path(folder))


def _flush(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def check_model_files(path: str, role: str, weights: bool = True) -> None:
    """A local model directory (one with config.json) must hold its tokenizer files and, with ``weights``, whole
    safetensors weights; otherwise a one-line error names the file. A directory llm-neo wrote must match the
    checksums it recorded."""
    directory = Path(os.path.expanduser(path))
    if directory.is_dir():
        verify_checksums(directory, f"{role} model")
    if not (directory / "config.json").is_file():
        return
    problem = _missing_tokenizer(directory) or (_weights_problem(directory) if weights else None)
    if PARTIAL in directory.name:
        problem = problem or "it is the temporary directory of a write"
    if problem:
        raise ConfigError(f"{role} model {path}: {problem}; {INTERRUPTED}")


def _missing_tokenizer(directory: Path) -> str | None:
    if any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    return f"config.json but no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)"


def _weights_problem(directory: Path) -> str | None:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError) as error:
            return f"{index.name} is not a complete weight index ({error})"
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif any(directory.glob("*.bin")):
        return None  # pickle weights: refused or allowed by --allow_pickle elsewhere
    else:
        return "config.json but no weights (model.safetensors)"
    for name in files:
        if not (directory / name).is_file():
            return f"{name} is missing (listed in {index.name})"
        problem = safetensors_problem(directory / name)
        if problem:
            return f"{name} is broken: {problem}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (None when its size is what its header says): 8 bytes of header length,
    the JSON header, then the tensors' bytes up to the largest end offset."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a header"
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            return f"{size} bytes, shorter than its {length}-byte header"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return "its header is not valid JSON"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if size != 8 + length + end:
        return f"{size} bytes where its header describes {8 + length + end}"
    return None
