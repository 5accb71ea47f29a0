"""The classification head of a sequence-classification run: its classes in id order and where texts end."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig


@dataclass(frozen=True)
class ClassHead:
    """A sequence-classification head: the class names in id order, and the pad id that marks where texts end."""

    labels: tuple[str, ...]
    pad_token_id: int

    @classmethod
    def for_classes(cls, names, tokenizer) -> ClassHead:
        """The head of a run over ``names`` (class names in id order)."""
        return cls(tuple(names), tokenizer.pad_token_id)

    @classmethod
    def from_run_config(cls, config: dict, tokenizer) -> ClassHead | None:
        """The head a run trained (its classes are in the resolved config), or None for a causal_lm run."""
        data = (config or {}).get("data", {})
        if data.get("task", "causal_lm") != "classification":
            return None
        return cls.for_classes(data["class_names"].split(","), tokenizer)

    @classmethod
    def from_saved_model(cls, model_dir, tokenizer) -> ClassHead | None:
        """The head of a saved sequence classifier (its config's classes), or None for a causal LM."""
        saved = AutoConfig.from_pretrained(model_dir)
        if not any(name.endswith("ForSequenceClassification") for name in saved.architectures or []):
            return None
        return cls.for_classes([saved.id2label[i] for i in range(saved.num_labels)], tokenizer)

    def model_kwargs(self, set_labels: bool = True) -> dict:
        """from_pretrained options; ``set_labels=False`` keeps the checkpoint's own classes (to check them)."""
        labels = {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                  "label2id": {name: i for i, name in enumerate(self.labels)}}
        return {**(labels if set_labels else {}), "pad_token_id": self.pad_token_id}
