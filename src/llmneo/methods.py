"""The four training methods of the paper's Table I: what is trainable and which loss terms are on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodPreset:
    name: str
    uses_adapter: bool  # True: frozen base + LoRA branch; False: every student weight trains
    uses_teacher: bool  # True: CE + KD; False: CE only (the teacher is never loaded)


METHODS = {
    "sft": MethodPreset("sft", uses_adapter=False, uses_teacher=False),
    "lora": MethodPreset("lora", uses_adapter=True, uses_teacher=False),
    "kd": MethodPreset("kd", uses_adapter=False, uses_teacher=True),
    "neo": MethodPreset("neo", uses_adapter=True, uses_teacher=True),
}

