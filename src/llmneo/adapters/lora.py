"""The student's LoRA adapter, built with PEFT (the paper: every linear layer except lm_head, r=128, alpha=2r)."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model

TARGET_PRESETS = {
    "all-linear": "all-linear",  # PEFT's preset: every nn.Linear except the output layer
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qkv": ["q_proj", "k_proj", "v_proj"],
}


def resolve_target_modules(spec: str):
    if spec in TARGET_PRESETS:
        return TARGET_PRESETS[spec]
    return [name.strip() for name in spec.split(",") if name.strip()]


def lora_config(adapter_args) -> LoraConfig:
    return LoraConfig(
        r=adapter_args.lora_r,
        lora_alpha=adapter_args.lora_alpha if adapter_args.lora_alpha is not None else 2 * adapter_args.lora_r,
        lora_dropout=adapter_args.lora_dropout,
        target_modules=resolve_target_modules(adapter_args.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(student, adapter_args):
    """Wrap the student in a PeftModel whose only trainable parameters are the LoRA A and B matrices."""
    return get_peft_model(student, lora_config(adapter_args))
