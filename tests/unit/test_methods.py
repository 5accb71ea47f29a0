"""methods.py and recipes.py: the four methods as the README's table states them, and the SST-2 recipe's options."""

from __future__ import annotations

import re
from pathlib import Path

from llmneo.config import parse_config
from llmneo.methods import METHODS
from llmneo.recipes import RECIPES

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_methods_table_states_what_each_method_trains_and_uses():
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \| ([^|]+) \|", README.read_text(encoding="utf-8"), re.M)
    table = {name: (trainable.strip(), loss.strip()) for name, trainable, loss in rows if name in METHODS}
    assert set(table) == set(METHODS)
    for name, preset in METHODS.items():
        assert preset.name == name
        assert (table[name][0] == "LoRA adapter only") == preset.uses_adapter
        assert ("KL" in table[name][1]) == preset.uses_teacher


def test_a_recipe_sets_its_options_and_flags_override_them():
    flags = ["--recipe", "sst2", "--student_model", "s", "--teacher_model", "t", "--dataset", "d.csv"]
    config = parse_config([*flags, "--teacher_quantization", "none"])
    recipe = RECIPES["sst2"]
    assert config.data.task == recipe["task"] and config.training.method == recipe["method"]
    assert (config.training.alpha, config.training.temperature) == (recipe["alpha"], recipe["temperature"])
    assert (config.adapter.lora_r, config.adapter.lora_alpha) == (recipe["lora_r"], recipe["lora_alpha"])
    assert config.model.teacher_quantization == "none"  # the flag wins over the recipe's nf4
    assert parse_config([*flags, "--teacher_quantization", "none", "--alpha", "0.2"]).training.alpha == 0.2
