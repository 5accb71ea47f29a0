"""Named recipes: option defaults that reproduce a known setup. A --config file and flags override them."""

from __future__ import annotations

RECIPES = {
    # Sequence-classification KD as in the SST-2 recipe: a 4-bit teacher, T = 2, alpha = 0.5, LoRA r = 4 on q, k, v.
    # On a machine without CUDA add --teacher_quantization none.
    "sst2": {
        "task": "classification",
        "method": "neo",
        "alpha": 0.5,
        "temperature": 2.0,
        "lora_r": 4,
        "lora_alpha": 8.0,
        "target_modules": "qkv",
        "teacher_quantization": "nf4",
    },
}

RECIPE_HELP = ("Start from a named recipe's options (a --config file and flags override them): "
               "sst2 = sequence-classification KD, 4-bit teacher, T=2, alpha=0.5, LoRA r=4 / alpha 8 on q,k,v.")
