"""A run directory belongs to one run: ``run.json`` says which (method, start, status), a directory that holds
another run is refused (or cleared with ``--overwrite_output_dir``), and only a finished run is merged or
evaluated."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..errors import ConfigError
from .atomic import write_atomically
from .checkpoints import checkpoints, complete_checkpoints
from .layout import ADAPTER_DIR, CHECKPOINT_PREFIX, CONFIG_FILE, LOCK_FILE, MODEL_DIR, RUN_FILE, RUN_MARKERS


def read_run_state(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write_run_state(run_dir: Path, state: dict) -> None:
    write_atomically(Path(run_dir) / RUN_FILE, (json.dumps(state, indent=1) + "\n").encode("utf-8"))


def mark_started(run_dir: str | Path, method: str, models: dict | None = None) -> None:
    """``models``: the identities of the weights the run reads by path (role -> models/identity.model_identity),
    which `eval` of the run checks again before it scores against the run's teacher."""
    _write_run_state(Path(run_dir), {"status": "running", "method": method, "started": _now(),
                                     **({"models": models} if models else {})})


def recorded_model(run_dir: str | Path, role: str) -> dict | None:
    """The identity of the ``role`` weights the run read when it started, if it recorded one."""
    return ((read_run_state(run_dir) or {}).get("models") or {}).get(role)


def mark_finished(run_dir: str | Path, steps: int) -> None:
    state = read_run_state(run_dir) or {}
    _write_run_state(Path(run_dir), {**state, "status": "finished", "steps": steps, "finished": _now()})


def mark_failed(run_dir: str | Path, error: BaseException) -> None:
    """The run stopped on ``error``: run.json says so, with the error's first line (only a run marked running:
    a refusal before the run started leaves the directory as it was)."""
    state = read_run_state(run_dir)
    if state is None or state.get("status") != "running":
        return
    reason = (str(error).splitlines() or [""])[0][:500]
    said = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
    _write_run_state(Path(run_dir), {**state, "status": "failed", "error": said, "stopped": _now()})


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def holds_run(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    return run_dir.is_dir() and (any((run_dir / name).exists() for name in RUN_MARKERS) or bool(checkpoints(run_dir)))


def run_status(run_dir: str | Path) -> tuple[str, int]:
    """("finished", steps) or ("interrupted", newest complete checkpoint step, 0 when none)."""
    state = read_run_state(run_dir)
    if state is not None and state.get("status") == "finished":
        return "finished", int(state.get("steps", 0))
    legacy_finished = state is None and any((Path(run_dir) / name).is_dir() for name in (ADAPTER_DIR, MODEL_DIR))
    if legacy_finished:  # written before run.json existed: its weights are only saved at the end
        return "finished", 0
    complete = complete_checkpoints(run_dir)
    return "interrupted", complete[-1][0] if complete else 0


def describe_run(run_dir: str | Path) -> str:
    """One line naming the run a directory holds: status, method and date."""
    state = read_run_state(run_dir) or {}
    status, step = run_status(run_dir)
    method = state.get("method") or _method_from_config(run_dir) or "unknown-method"
    when = state.get("finished") or state.get("started") or "an unknown date"
    if status == "finished":
        return f"a finished {method} run ({step} steps, {when})" if step else f"a finished {method} run"
    return f"an interrupted {method} run (newest complete checkpoint at step {step}, started {when})"


def _method_from_config(run_dir: str | Path) -> str | None:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    import yaml

    return ((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("distill") or {}).get("method")


def claim_output_dir(run_dir: str | Path, overwrite: bool, resuming: bool) -> None:
    """Refuse a directory that holds another run; with ``overwrite`` remove its contents first. (The directory
    itself was checked and created by the run's DirectoryLock.)"""
    run_dir = Path(run_dir)
    if resuming or not holds_run(run_dir):
        return
    if not overwrite:
        raise ConfigError(f"output_dir {run_dir} already holds {describe_run(run_dir)}: choose another --output_dir, "
                          "pass --overwrite_output_dir true to replace it, or --resume_from_checkpoint latest to "
                          "continue it")
    for item in run_dir.iterdir():
        if item.name == LOCK_FILE:
            continue
        shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()


def require_finished(run_dir: str | Path, command: str) -> None:
    """``merge``, ``eval`` and ``export-lora`` read only runs that finished."""
    status, step = run_status(run_dir)
    if status == "finished":
        return
    verb = command if command in ("merge", "export-lora") else "merge"  # eval reads merged models
    checkpoint = Path(run_dir) / f"{CHECKPOINT_PREFIX}{step}"
    explicit = f", or {verb} checkpoint-{step} explicitly (llm-neo {verb} {checkpoint} --output DIR)" if step else ""
    raise ConfigError(f"{run_dir} holds a run that did not finish (interrupted at step {step}): resume it with "
                      f"llm-neo distill ... --resume_from_checkpoint latest{explicit}")


def require_new_output(path: str | Path, option: str = "--output") -> None:
    """Commands that write a model somewhere new refuse a path that is a file or a non-empty directory: writing
    into it would report success over someone else's files, or mix old and new ones."""
    path = Path(path)
    if path.is_file():
        raise ConfigError(f"{option} {path} is an existing file: give a directory path")
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"{option} {path} already exists and is not empty: choose another {option}, or remove it")
