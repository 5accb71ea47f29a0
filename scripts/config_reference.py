"""Print the options reference (llm-neo's own options) as a Markdown table, from the dataclasses.

`python scripts/config_reference.py --write` replaces the table in docs/options.md instead.
"""

import dataclasses
import sys
import types
import typing
from pathlib import Path

from llmneo.config import CONFIG_CLASSES, DistillArguments, NeoTrainingArguments

# docs/options.md groups options as the run's config.yaml does: the distillation settings before transformers' own.
SECTIONS = (*CONFIG_CLASSES[:-1], DistillArguments, NeoTrainingArguments)


def rows():
    for cls in SECTIONS:
        own = NeoTrainingArguments.__annotations__ if cls is NeoTrainingArguments else None
        for field in dataclasses.fields(cls):
            if own is not None and field.name not in own:
                continue
            default = field.default if field.default is not dataclasses.MISSING else ""
            yield (cls.__name__, field.name, default, values(cls, field),
                   " ".join(field.metadata["help"].split()).replace("%%", "%"))


def values(cls, field) -> str:
    """The declared range of a number, or the choices of a Literal."""
    if field.metadata.get("valid") is not None:
        return str(field.metadata["valid"])
    hint = typing.get_type_hints(cls)[field.name]
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    choices = [choice for kind in kinds if typing.get_origin(kind) is typing.Literal for choice in typing.get_args(kind)]
    return ", ".join(choices)


def table() -> str:
    lines = ["| option | default | values | meaning |", "|---|---|---|---|"]
    lines += [f"| `{name}` | `{default}` | {valid} | {text} |" for _, name, default, valid, text in rows()]
    return "\n".join(lines)


def write_reference(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    start = text.index("| option | default |")
    end = text.find("\n\n", start)
    end = end if end >= 0 else len(text.rstrip("\n"))  # the table closes the file
    path.write_text(text[:start] + table() + text[end:], encoding="utf-8")


def main():
    if "--write" in sys.argv[1:]:
        write_reference(Path(__file__).resolve().parent.parent / "docs" / "options.md")
    else:
        print(table())


if __name__ == "__main__":
    main()
