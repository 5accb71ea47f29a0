"""The frozen teacher: loaded (optionally quantized, or as a trained sequence classifier), then frozen for
forward passes only."""

from __future__ import annotations

import torch

from ..errors import ConfigError, VocabularyError
from ..models.class_head import ClassHead
from ..models.loading import LoadOptions, load_pretrained_model


def freeze_teacher(teacher: torch.nn.Module) -> torch.nn.Module:
    """Frozen, eval mode, no KV cache: the teacher only ever runs forward passes for the KD term."""
    teacher.eval()
    teacher.requires_grad_(False)
    teacher.config.use_cache = False
    return teacher


def load_teacher(model_args, quantized: bool = True, head: ClassHead | None = None):
    """The frozen teacher; ``quantized=False`` ignores --teacher_quantization (the fidelity check's reference).
    With ``head`` it is a trained sequence classifier over exactly those classes."""
    teacher = load_pretrained_model(model_args.teacher_model, "teacher", LoadOptions.of(model_args, "teacher", quantized),
                                    head.model_kwargs(set_labels=False) if head is not None else None)
    if head is not None:
        check_class_head(teacher, head, model_args.teacher_model)
    return freeze_teacher(teacher)


def check_class_head(teacher, head: ClassHead, path: str) -> None:
    """A classification teacher must bring a trained head over the run's classes, or KD would copy noise."""
    names = tuple(teacher.config.id2label[i] for i in range(teacher.config.num_labels))
    if teacher.newly_initialized:
        raise ConfigError(
            f"teacher model {path} has no trained classification head ({', '.join(teacher.newly_initialized)} "
            "missing from its weights): fine-tune it first, e.g. llm-neo distill --task classification --method lora "
            "--student_model TEACHER, then llm-neo merge")
    if names != head.labels:
        raise VocabularyError(f"the teacher {path} classifies into {list(names)} but the data's classes are "
                              f"{list(head.labels)}: pass --class_names in the teacher's order")
