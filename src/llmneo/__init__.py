"""llm-neo: parameter-efficient knowledge distillation of LLMs (LoRA student + CE/KD loss).

The Python API's names, imported on first use so that ``import llmneo`` (and ``llm-neo --help``) stays fast:
``RunConfig`` (``RunConfig.from_options(**options)``: a run's options as keyword arguments), ``distill``, and
``NeoTrainer`` (TRL's trainer shape: models, tokenizers and datasets as objects or paths) with its
``NeoTrainingArguments``.
"""

__version__ = "0.1.0"

_PUBLIC = {"RunConfig": "llmneo.config", "NeoTrainingArguments": "llmneo.config", "NeoTrainer": "llmneo.api",
           "distill": "llmneo.pipeline", "RunSummary": "llmneo.pipeline"}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'llmneo' has no attribute {name!r}")
