"""The trainers: NeoTrainer (token level) and ClassifierTrainer (class logits), siblings over DistillationTrainer."""

from .classifier import ClassifierTrainer
from .metrics_log import MetricsJsonlCallback
from .token_level import NeoTrainer

__all__ = ["ClassifierTrainer", "MetricsJsonlCallback", "NeoTrainer"]
