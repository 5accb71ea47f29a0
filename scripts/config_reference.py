"""Print the options reference (llm-neo's own options) as a Markdown table, from the dataclasses.

`python scripts/config_reference.py --write` replaces the table in docs/options.md instead.
"""

import dataclasses
import sys
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
            yield cls.__name__, field.name, default, " ".join(field.metadata["help"].split()).replace("%%", "%")


def table() -> str:
    lines = ["| option | default | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | `{default}` | {text} |" for _, name, default, text in rows()]
    return "\n".join(lines)


def write_reference(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    start = text.index("| option | default | meaning |")
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
