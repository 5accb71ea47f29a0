"""Print the README's config reference (llm-neo's own options) as a Markdown table, from the dataclasses."""

import dataclasses

from llmneo.config import CONFIG_CLASSES, NeoTrainingArguments


def rows():
    for cls in CONFIG_CLASSES:
        own = NeoTrainingArguments.__annotations__ if cls is NeoTrainingArguments else None
        for field in dataclasses.fields(cls):
            if own is not None and field.name not in own:
                continue
            default = field.default if field.default is not dataclasses.MISSING else ""
            yield cls.__name__, field.name, default, " ".join(field.metadata["help"].split())


def main():
    print("| option | default | meaning |")
    print("|---|---|---|")
    for _, name, default, text in rows():
        print(f"| `{name}` | `{default}` | {text} |")


if __name__ == "__main__":
    main()
