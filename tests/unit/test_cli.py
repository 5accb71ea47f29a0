"""The command line's surface: --version, the top-level usage, and the shape of `distill --help`."""

from __future__ import annotations

import re

import pytest

import llmneo
from llmneo import cli


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"llm-neo {llmneo.__version__}\n"


def test_the_usage_names_every_command_and_where_options_are(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "llm-neo COMMAND --help" in out and "--version" in out
    assert all(f"  {name} " in out for name in cli.COMMANDS)


def test_distill_help_opens_with_a_short_synopsis_and_groups_the_options(capsys):
    """The synopsis is one line (argparse's would list all ~150 options), and the options come in sections."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["distill", "--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "usage: llm-neo distill [--config FILE.yaml] [--recipe NAME] [--OPTION VALUE ...]"
    assert lines[1] == ""
    sections = [line[:-1] for line in lines if re.fullmatch(r"[a-z][^ ].*:", line)]
    assert sections == ["options", "models", "data", "adapter",
                        "distillation and training (with transformers' TrainingArguments)"]
    section_of = {}
    current = None
    for line in lines:
        if line[:-1] in sections:
            current = line[:-1]
        option = re.match(r"\s+(--\w+)", line)
        if option and current:
            section_of.setdefault(option.group(1), current)
    assert section_of["--student_model"] == "models" and section_of["--dataset"] == "data"
    assert section_of["--lora_r"] == "adapter" and section_of["--alpha"].startswith("distillation")
    assert section_of["--config"] == "options"
