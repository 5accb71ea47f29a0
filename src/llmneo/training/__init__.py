"""The trainers: TokenDistillTrainer (token level) and ClassifierTrainer (class logits), siblings over DistillTrainerBase."""

from .classifier import ClassifierTrainer
from .metrics_log import MetricsJsonlCallback
from .token_level import TokenDistillTrainer

__all__ = ["ClassifierTrainer", "MetricsJsonlCallback", "TokenDistillTrainer"]
