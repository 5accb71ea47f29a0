"""llmneo.trl: TRL 1.16's DistillationConfig fields mapped to llm-neo's options, and the ones without an equivalent
refused by name."""

from __future__ import annotations

import dataclasses

import pytest

from llmneo.config import NeoTrainingArguments
from llmneo.errors import ConfigError
from llmneo.trl import UNSUPPORTED, DistillationConfig, DistillationTrainer, default_output_dir, llmneo_options


def config(**fields) -> DistillationConfig:
    return DistillationConfig(output_dir="out", **fields)


@pytest.mark.parametrize(("beta", "expected"), [(0.0, {"divergence": "forward_kl"}), (1.0, {"divergence": "reverse_kl"}),
                                                (0.3, {"divergence": "jsd", "jsd_beta": 0.3})])
def test_beta_selects_the_divergence_as_trl_defines_it(beta, expected):
    options = llmneo_options(config(beta=beta))
    assert {key: options[key] for key in expected} == expected
    assert options["on_policy_fraction"] == 1.0 and options["alpha"] == 0.0  # every step on-policy, no CE term


def test_generation_options_map_to_the_rollouts():
    options = llmneo_options(config(max_completion_length=64, temperature=0.7, top_p=0.9))
    assert (options["rollout_max_new_tokens"], options["rollout_temperature"], options["rollout_top_p"]) == (64, 0.7, 0.9)
    assert options["temperature"] == 0.7  # TRL's temperature is the loss's too
    assert llmneo_options(config(top_k=1))["rollout_temperature"] == 0.0  # greedy
    assert llmneo_options(config(model_init_kwargs={"dtype": "bfloat16"}))["dtype"] == "bfloat16"
    import torch

    assert llmneo_options(config(teacher_model_init_kwargs={"torch_dtype": torch.float16}))["teacher_dtype"] == "float16"


def test_the_trainer_arguments_are_kept():
    options = llmneo_options(config(learning_rate=3e-4, max_steps=7, seed=5, kd_chunk_size=64))
    assert (options["learning_rate"], options["max_steps"], options["seed"], options["kd_chunk_size"]) == (3e-4, 7, 5, 64)
    assert "beta" not in options and "top_k" not in options


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_every_option_without_an_equivalent_is_refused_by_name(name):
    default = UNSUPPORTED[name]
    value = (not default) if isinstance(default, bool) else 7 if default is None or isinstance(default, (int, float)) \
        else "other"
    with pytest.raises(ConfigError, match=rf"^DistillationConfig {name}=.* has no llm-neo equivalent"):
        llmneo_options(config(**{name: value}))


def test_other_refusals():
    with pytest.raises(ConfigError, match=r"top_k=5: llm-neo samples from the whole distribution \(0\) or greedily"):
        llmneo_options(config(top_k=5))
    with pytest.raises(ConfigError, match=r"model_init_kwargs 'device_map' has no llm-neo equivalent"):
        llmneo_options(config(model_init_kwargs={"device_map": "auto"}))
    with pytest.raises(ConfigError, match=r"DistillationTrainer data_collator= has no llm-neo equivalent"):
        DistillationTrainer("s", "t", data_collator=object())


def test_every_trl_field_is_declared():
    """TRL 1.16's DistillationConfig, field for field (read from its source: trl/trainer/distillation_config.py)."""
    trl_fields = {"model_init_kwargs", "trust_remote_code", "teacher_model_name_or_path", "teacher_model_revision",
                  "teacher_model_init_kwargs", "disable_dropout", "remove_unused_columns", "max_completion_length",
                  "ds3_gather_for_generation", "shuffle_dataset", "pad_to_multiple_of", "temperature", "top_p",
                  "top_k", "min_p", "generation_kwargs", "chat_template_kwargs", "repetition_penalty",
                  "cache_implementation", "use_vllm", "vllm_mode", "vllm_model_impl", "vllm_enable_sleep_mode",
                  "vllm_structured_outputs_regex", "vllm_server_base_url", "vllm_server_host", "vllm_server_port",
                  "vllm_server_timeout", "vllm_group_port", "vllm_gpu_memory_utilization", "vllm_max_model_length",
                  "vllm_tensor_parallel_size", "beta", "max_tool_calling_iterations", "log_completions",
                  "num_completions_to_print", "log_unique_prompts", "learning_rate"}
    ours = {field.name for field in dataclasses.fields(DistillationConfig)}
    assert trl_fields <= ours
    assert issubclass(DistillationConfig, NeoTrainingArguments)


def test_without_args_the_run_goes_where_trls_would():
    assert default_output_dir("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen2.5-0.5B-Instruct-Distillation"
    assert default_output_dir("models/student/") == "student-Distillation"


def test_the_trl_fields_have_trls_defaults():
    """An untouched TRL config must pass, and a changed option must not look untouched: each TRL field's default is
    TRL 1.16's own (read from the installed trl)."""
    import trl  # installed by the README's install command

    from llmneo.trl import TRL_FIELDS

    theirs = {item.name: item.default for item in dataclasses.fields(trl.DistillationConfig)}
    ours = {item.name: item.default for item in dataclasses.fields(DistillationConfig)}
    assert {name: ours[name] for name in TRL_FIELDS} == {name: theirs[name] for name in TRL_FIELDS}


def test_trls_vllm_options_point_to_the_rollout_server():
    with pytest.raises(ConfigError, match="DistillationConfig use_vllm=True has no llm-neo equivalent: for rollouts "
                                          "on vLLM set rollout_server"):
        llmneo_options(DistillationConfig(output_dir="x", use_vllm=True))
    config = DistillationConfig(output_dir="x", rollout_server="http://127.0.0.1:8001/v1")
    assert llmneo_options(config)["rollout_server"] == "http://127.0.0.1:8001/v1"
