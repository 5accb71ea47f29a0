"""A drop-in for TRL's ``DistillationTrainer`` (TRL 1.16): ``from llmneo.trl import DistillationConfig,
DistillationTrainer`` in place of ``from trl import ...``.

TRL's trainer is on-policy: the student completes each row's ``"prompt"`` and learns the generalized JSD to the
teacher on its completions (``beta`` 0 forward KL, 1 reverse KL). Here every such run is an llm-neo run with
``on_policy_fraction 1`` and ``alpha 0``, each TRL option mapped to llm-neo's (docs/python-api.md has the table), and
llm-neo's own options (a served or cached teacher, another tokenizer, off-policy and mixed steps) beside them. A TRL
option that llm-neo cannot honour is refused in one line naming it, never ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .api import NeoTrainer, options_of
from .config import NeoTrainingArguments, _help
from .errors import ConfigError

# TRL 1.16's DistillationConfig fields that llm-neo has no equivalent for: a run may leave them at TRL's defaults
# (declared with the fields below), and is refused when it sets them.
NO_EQUIVALENT = (
    "teacher_model_revision", "disable_dropout", "ds3_gather_for_generation", "shuffle_dataset", "min_p",
    "generation_kwargs", "chat_template_kwargs", "repetition_penalty", "cache_implementation", "vllm_mode",
    "vllm_model_impl", "vllm_enable_sleep_mode", "vllm_structured_outputs_regex", "vllm_server_base_url",
    "vllm_server_host", "vllm_server_port", "vllm_server_timeout", "vllm_group_port", "vllm_gpu_memory_utilization",
    "vllm_max_model_length", "vllm_tensor_parallel_size", "max_tool_calling_iterations", "log_completions",
    "num_completions_to_print", "log_unique_prompts", "use_vllm",
)
# TRL's vLLM options drive its own `trl vllm-serve` protocol (full weights over NCCL): llm-neo's rollout server is
# vLLM's OpenAI server, which loads the adapter alone.
VLLM_HINT = (": for rollouts on vLLM set rollout_server to a vLLM OpenAI server of the student's base with LoRA on "
             "(scripts/vllm_rollout_server.sh starts one; llm-neo syncs the adapter alone), not a `trl vllm-serve`")
HINTS = {name: VLLM_HINT for name in NO_EQUIVALENT if "vllm" in name}


@dataclass
class DistillationConfig(NeoTrainingArguments):
    """TRL 1.16's DistillationConfig fields beside llm-neo's options; the defaults make an on-policy run with no CE
    term, as TRL's trainer is."""

    alpha: float = _help("Weight of CE on the rows' answers; TRL's loss has none (0).", 0.0)
    on_policy_fraction: float = _help("Share of steps on the student's own completions; TRL's: every step (1).", 1.0)
    beta: float = _help("Generalized JSD: 0 is forward KL(teacher || student), 1 reverse KL (TRL's default).", 1.0)
    max_completion_length: int | None = _help("Tokens generated per completion at most (rollout_max_new_tokens).", 512)
    top_p: float = _help("Nucleus sampling mass of the completions (rollout_top_p).", 1.0)
    top_k: int = _help("Top-k sampling: 0 off, 1 greedy (rollout_temperature 0); llm-neo has no other top-k.", 0)
    model_init_kwargs: dict | None = _help("When the model is a path: from_pretrained options (only 'dtype').")
    teacher_model_init_kwargs: dict | None = _help("Likewise for the teacher (only 'dtype').")
    teacher_model_name_or_path: str | None = _help("The teacher's path when the trainer is given none.")
    trust_remote_code: bool = _help("Let model repositories run their own code.", False)
    remove_unused_columns: bool = _help("Kept off: the data pipeline already keeps what it needs.", False)
    pad_to_multiple_of: int | str | None = _help("Ignored ('auto' or None): llm-neo pads to the longest row.", "auto")
    teacher_model_revision: str | None = _help("No llm-neo equivalent: give the revision's local path.")
    disable_dropout: bool = _help("No llm-neo equivalent.", False)
    ds3_gather_for_generation: bool = _help("No llm-neo equivalent.", True)
    shuffle_dataset: bool = _help("No llm-neo equivalent (rows are shuffled by the seed).", True)
    min_p: float | None = _help("No llm-neo equivalent.")
    generation_kwargs: dict | None = _help("No llm-neo equivalent.")
    chat_template_kwargs: dict | None = _help("No llm-neo equivalent.")
    repetition_penalty: float = _help("No llm-neo equivalent.", 1.0)
    cache_implementation: str | None = _help("No llm-neo equivalent.")
    use_vllm: bool = _help("Refused: TRL's vLLM protocol; set rollout_server (a vLLM OpenAI server) instead.", False)
    vllm_mode: str = _help("Refused: see use_vllm.", "colocate")
    vllm_model_impl: str = _help("Refused: see use_vllm.", "vllm")
    vllm_enable_sleep_mode: bool = _help("Refused: see use_vllm.", False)
    vllm_structured_outputs_regex: str | None = _help("Refused: see use_vllm.")
    vllm_server_base_url: str | None = _help("Refused: see use_vllm.")
    vllm_server_host: str = _help("Refused: see use_vllm.", "0.0.0.0")
    vllm_server_port: int = _help("Refused: see use_vllm.", 8000)
    vllm_server_timeout: float = _help("Refused: see use_vllm.", 240.0)
    vllm_group_port: int = _help("Refused: see use_vllm.", 51216)
    vllm_gpu_memory_utilization: float = _help("Refused: see use_vllm.", 0.3)
    vllm_max_model_length: int | None = _help("Refused: see use_vllm.")
    vllm_tensor_parallel_size: int = _help("Refused: see use_vllm.", 1)
    max_tool_calling_iterations: int | None = _help("No llm-neo equivalent (no tool calling).")
    log_completions: bool = _help("No llm-neo equivalent (the run's report.md shows held-out answers).", False)
    num_completions_to_print: int | None = _help("No llm-neo equivalent.")
    log_unique_prompts: bool = _help("No llm-neo equivalent.", False)


TRL_FIELDS = {item.name for item in fields(DistillationConfig)} - {item.name for item in fields(NeoTrainingArguments)}
UNSUPPORTED = {item.name: item.default for item in fields(DistillationConfig) if item.name in NO_EQUIVALENT}


def llmneo_options(args: DistillationConfig) -> dict:
    """The llm-neo options a DistillationConfig stands for; a TRL option without an equivalent is refused."""
    for name, default in UNSUPPORTED.items():
        if getattr(args, name) != default:
            raise ConfigError(f"DistillationConfig {name}={getattr(args, name)!r} has no llm-neo equivalent"
                              f"{HINTS.get(name, '')}: leave it at {default!r}")
    if args.top_k not in (0, 1):
        raise ConfigError(f"DistillationConfig top_k={args.top_k}: llm-neo samples from the whole distribution (0) "
                          "or greedily (1)")
    if args.pad_to_multiple_of not in ("auto", None):
        raise ConfigError(f"DistillationConfig pad_to_multiple_of={args.pad_to_multiple_of!r} has no llm-neo "
                          "equivalent: leave it at 'auto'")
    options = {name: value for name, value in options_of(args).items() if name not in TRL_FIELDS}
    options.update(_divergence(args.beta), trust_remote_code=args.trust_remote_code, rollout_top_p=args.top_p,
                   rollout_temperature=0.0 if args.top_k == 1 else args.temperature)
    if args.max_completion_length is not None:
        options["rollout_max_new_tokens"] = args.max_completion_length
    options.update(_dtype(args.model_init_kwargs, "model_init_kwargs", "dtype"),
                   **_dtype(args.teacher_model_init_kwargs, "teacher_model_init_kwargs", "teacher_dtype"))
    return options


def default_output_dir(model) -> str:
    """TRL's: ``<model name>-Distillation`` in the current folder."""
    name = model if isinstance(model, str) else getattr(model, "name_or_path", "") or "model"
    return f"{name.rstrip('/').split('/')[-1]}-Distillation"


def _divergence(beta: float) -> dict:
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"DistillationConfig beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return {"divergence": "forward_kl"}
    if beta == 1.0:
        return {"divergence": "reverse_kl"}
    return {"divergence": "jsd", "jsd_beta": beta}


def _dtype(init_kwargs: dict | None, name: str, option: str) -> dict:
    if not init_kwargs:
        return {}
    other = sorted(set(init_kwargs) - {"dtype", "torch_dtype"})
    if other:
        raise ConfigError(f"DistillationConfig {name} {other[0]!r} has no llm-neo equivalent (only 'dtype' is read)")
    dtype = init_kwargs.get("dtype", init_kwargs.get("torch_dtype"))
    return {option: str(dtype).removeprefix("torch.")}


class DistillationTrainer(NeoTrainer):
    """TRL's DistillationTrainer signature over llm-neo's run: ``train()`` writes llm-neo's run directory."""

    def __init__(self, model, teacher_model=None, args: DistillationConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, peft_config=None, **rest):
        for name in ("compute_metrics", "optimizers", "preprocess_logits_for_metrics", "reward_funcs", "tools"):
            if rest.get(name) is not None:
                raise ConfigError(f"DistillationTrainer {name}= has no llm-neo equivalent")
            rest.pop(name, None)
        if data_collator is not None:
            raise ConfigError("DistillationTrainer data_collator= has no llm-neo equivalent: llm-neo tokenizes and "
                              "collates the rows itself")
        args = args if args is not None else DistillationConfig(output_dir=default_output_dir(model))
        if not isinstance(args, DistillationConfig):
            raise ConfigError(f"args must be llmneo.trl.DistillationConfig, got {type(args).__name__}")
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        super().__init__(model, teacher_model=teacher_model, args=llmneo_options(args), train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, peft_config=peft_config,
                         shared_tokenizer=True, **rest)
