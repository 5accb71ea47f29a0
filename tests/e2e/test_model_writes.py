"""Model directories appear whole or not at all: merge, export-lora, prune-layers and import-gguf SIGKILLed (by
their own PID) before the weights, in the middle of them and before the tokenizer files leave no output directory;
the next call removes what the killed one left and writes a directory equal to an uninterrupted write (weights
byte-identical). A hand-truncated model directory gets a one-line message from every reader."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import checkout_env, run_flags
from killer import WRITE_KILLER
from tiny_gguf import write_gguf
from llmneo import cli

pytestmark = pytest.mark.e2e
POINTS = ("weights-start", "weights-middle", "tokenizer")
WEIGHTS = {"export-lora": "adapter_model.safetensors"}  # the others write model.safetensors


@pytest.fixture(scope="module")
def sources(models_dir, train_file, tokenizer, tmp_path_factory) -> dict:
    """A finished neo run, a model directory and a GGUF package: what the four writers read."""
    from llmneo.demo.tiny import build_tiny_llama

    root = tmp_path_factory.mktemp("sources")
    assert cli.main(["distill", *run_flags(models_dir, train_file, root / "run", max_steps=1)]) == 0
    (root / "pkg").mkdir()
    write_gguf(build_tiny_llama(tokenizer, num_layers=2, seed=52).eval(), tokenizer, root / "pkg" / "tiny.Q.gguf")
    return {"run": str(root / "run"), "model": models_dir["teacher"], "gguf": str(root / "pkg")}


def command(writer: str, sources: dict, output: Path) -> list[str]:
    source = {"merge": sources["run"], "export-lora": sources["run"], "prune-layers": sources["model"],
              "import-gguf": sources["gguf"]}[writer]
    extra = ["--keep", "1"] if writer == "prune-layers" else []
    return [writer, source, *extra, "--output", str(output)]


@pytest.fixture(scope="module")
def uninterrupted(sources, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("uninterrupted")
    for writer in ("merge", "export-lora", "prune-layers", "import-gguf"):
        assert cli.main(command(writer, sources, root / writer)) == 0
    return {writer: root / writer for writer in ("merge", "export-lora", "prune-layers", "import-gguf")}


@pytest.mark.parametrize("writer", ["merge", "export-lora", "prune-layers", "import-gguf"])
def test_a_killed_write_leaves_no_directory_and_the_next_is_whole(sources, uninterrupted, tmp_path, writer, caplog):
    expected = uninterrupted[writer]
    for point in POINTS:
        output = tmp_path / point / "out"
        output.parent.mkdir()
        killed = subprocess.run([sys.executable, "-c", WRITE_KILLER, point, *command(writer, sources, output)],
                                capture_output=True, text=True, env=checkout_env(OMP_NUM_THREADS="1"))
        assert killed.returncode == -9, (point, killed.stderr[-2000:])
        assert not output.exists(), point
        (leftover,) = output.parent.iterdir()  # the killed write's hidden sibling, never named as the output
        assert leftover.name.startswith(".out.partial-"), point
        caplog.clear()
        assert cli.main(command(writer, sources, output)) == 0
        assert str(leftover) in caplog.text and [path.name for path in output.parent.iterdir()] == ["out"]
        assert sorted(path.name for path in output.iterdir()) == sorted(path.name for path in expected.iterdir())
        weights = WEIGHTS.get(writer, "model.safetensors")
        assert (output / weights).read_bytes() == (expected / weights).read_bytes(), point
    if writer != "export-lora":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        AutoModelForCausalLM.from_pretrained(output), AutoTokenizer.from_pretrained(output)


def truncated(source: str, folder: Path, damage: str) -> Path:
    """A copy of a model directory at ``folder``, damaged as an interrupted write leaves one."""
    shutil.copytree(source, folder)
    return damaged(folder, damage)


def damaged(folder: Path, damage: str) -> Path:
    if damage == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    elif damage == "short weights":
        os.truncate(folder / "model.safetensors", (folder / "model.safetensors").stat().st_size // 2)
    else:
        (folder / "model.safetensors").unlink()
    return folder


@pytest.mark.parametrize("damage, named", [("no tokenizer", "no tokenizer files"),
                                           ("short weights", "model.safetensors is broken"),
                                           ("no weights", "no weights (model.safetensors)")])
def test_every_reader_names_a_half_written_model_directory(models_dir, train_file, tmp_path, capsys, damage, named):
    base = tmp_path / "base"  # a run's base, damaged after the run finished: merge reads it again
    shutil.copytree(models_dir["student"], base)
    run = tmp_path / "run"
    assert cli.main(["distill", *run_flags({**models_dir, "student": str(base)}, train_file, run, max_steps=1)]) == 0
    damaged(base, damage)
    broken = str(truncated(models_dir["student"], tmp_path / "student", damage))
    teacher = str(truncated(models_dir["teacher"], tmp_path / "teacher", damage))
    readers = {
        "merge (the run's base)": ["merge", str(run), "--output", str(tmp_path / "merged")],
        "eval": ["eval", broken, "--dataset", train_file],
        "generate": ["generate", broken, "--prompt", "hello"],
        "distill --student_model": ["distill", *run_flags({**models_dir, "student": broken}, train_file,
                                                          tmp_path / "a")],
        "distill --teacher_model": ["distill", *run_flags(models_dir, train_file, tmp_path / "b", teacher=teacher)],
        "cache-teacher": ["cache-teacher", "--cache_dir", str(tmp_path / "cache"),
                          *run_flags(models_dir, train_file, tmp_path / "c", teacher=teacher)],
    }
    for name, argv in readers.items():
        capsys.readouterr()
        assert cli.main(argv) != 0, name
        printed = capsys.readouterr().err
        lines = [line for line in printed.splitlines() if "interrupted write" in line]
        assert len(lines) == 1 and named in lines[0], (name, printed[-1500:])


def zero_last_block(path: Path, size: int = 4096) -> None:
    """Storage corruption that keeps the size and the header: the last ``size`` bytes become zeros."""
    with open(path, "r+b") as handle:
        handle.seek(-size, os.SEEK_END)
        handle.write(b"\0" * size)


def test_every_reader_names_weights_damaged_after_a_write(models_dir, train_file, uninterrupted, tmp_path, capsys):
    """Row 9: a merged model whose model.safetensors had its last 4 KiB zeroed (same size, same header) is named
    by every reader instead of being evaluated, answered with or trained on."""
    merged = tmp_path / "merged"
    shutil.copytree(uninterrupted["merge"], merged)
    zero_last_block(merged / "model.safetensors")
    run = tmp_path / "run"  # a run on the merged model, whose base is damaged afterwards: merge reads it again
    base = tmp_path / "base"
    shutil.copytree(uninterrupted["merge"], base)
    assert cli.main(["distill", *run_flags({**models_dir, "student": str(base)}, train_file, run, max_steps=1)]) == 0
    zero_last_block(base / "model.safetensors")
    readers = {
        "eval": ["eval", str(merged), "--dataset", train_file],
        "generate": ["generate", str(merged), "--prompt", "hello"],
        "distill --student_model": ["distill", *run_flags({**models_dir, "student": str(merged)}, train_file,
                                                          tmp_path / "a")],
        "distill --teacher_model": ["distill", *run_flags(models_dir, train_file, tmp_path / "b", teacher=str(merged))],
        "cache-teacher": ["cache-teacher", "--cache_dir", str(tmp_path / "cache"),
                          *run_flags(models_dir, train_file, tmp_path / "c", teacher=str(merged))],
        "merge (the run's base)": ["merge", str(run), "--output", str(tmp_path / "merged-again")],
        "prune-layers": ["prune-layers", str(merged), "--keep", "1", "--output", str(tmp_path / "pruned")],
    }
    for name, argv in readers.items():
        capsys.readouterr()
        assert cli.main(argv) == 1, name
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llm-neo ")]
        assert len(lines) == 1, (name, lines)
        assert "model.safetensors does not match the checksum recorded when llm-neo wrote it" in lines[0], (name, lines)
        assert "differ from what was written" in lines[0], (name, lines)


@pytest.mark.parametrize("writer", ["merge", "export-lora", "prune-layers", "import-gguf"])
def test_a_flipped_byte_in_any_file_of_a_written_directory_is_named(uninterrupted, tmp_path, writer):
    from llmneo.runtime.checksums import CHECKSUM_FILE, verify_checksums
    from llmneo.errors import ConfigError

    names = sorted(path.name for path in uninterrupted[writer].iterdir() if path.name != CHECKSUM_FILE)
    assert any(name.endswith(".safetensors") for name in names)
    for name in names:
        copy = tmp_path / name
        shutil.copytree(uninterrupted[writer], copy)
        verify_checksums(copy, writer)
        size = (copy / name).stat().st_size
        with open(copy / name, "r+b") as handle:
            handle.seek(size * 2 // 3)
            byte = handle.read(1)
            handle.seek(size * 2 // 3)
            handle.write(bytes([byte[0] ^ 0x80]))
        with pytest.raises(ConfigError, match=f"{name} does not match the checksum"):
            verify_checksums(copy, writer)


@pytest.mark.parametrize("writer", ["merge", "export-lora", "prune-layers", "import-gguf"])
def test_written_files_have_the_permissions_of_a_plain_write(uninterrupted, writer):
    """Row 10: `merge` wrote model.safetensors with mode 0600 (a library's private temporary file renamed into
    place), unreadable by another user or a server running as one; every file gets what the umask gives."""
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for path in uninterrupted[writer].iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
