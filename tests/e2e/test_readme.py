"""The README is what a newcomer reads first: its Python quickstart runs as written, it stays short, and every page
it (or a page under docs/) links to exists."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.e2e
def test_the_python_quickstart_runs_as_written(tmp_path, monkeypatch):
    (code,) = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    summary = namespace["summary"]
    assert summary.steps == 10
    assert math.isfinite(summary.final_metrics["eval_perplexity"])
    adapter = load_file(tmp_path / "quickstart" / "run" / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in name and value.abs().sum() > 0 for name, value in adapter.items())  # it learned
    assert (tmp_path / "quickstart" / "run" / "README.md").is_file()


def test_the_readme_stays_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 220


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda path: path.name)
def test_every_relative_link_exists(page):
    missing = [target for target in LINK.findall(page.read_text(encoding="utf-8"))
               if "://" not in target and not (page.parent / target).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing {missing}"


def test_every_test_named_in_the_reliability_table_exists():
    """docs/reliability.md backs each row with `tests/FILE::TEST`: each named file holds that test function."""
    root = Path(__file__).resolve().parents[2]
    named = re.findall(r"`((?:unit|e2e)/[\w/]+\.py)::(\w+)", (root / "docs" / "reliability.md").read_text())
    assert len(named) > 50
    missing = [f"{path}::{name}" for path, name in named
               if f"def {name}(" not in (root / "tests" / path).read_text(encoding="utf-8")]
    assert not missing, missing
