"""llm-neo: parameter-efficient knowledge distillation of LLMs (LoRA student + CE/KD loss)."""

__version__ = "0.1.0"
