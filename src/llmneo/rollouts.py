"""On-policy rollouts: the student answers each training row's last prompt with its current adapter.

Which engine generates the answers (in the trainer's process with transformers, or on a vLLM server that loads the
current adapter) is rollout_engines.py; this module cuts the prompts, bounds the answers by the model's positions,
counts what the rollouts cost and turns the answers into a training batch.

A row's prompt is its conversation up to its last assistant answer (the tokens before that answer's labels: the
chat template's rendering with the generation prompt, as the data side cut it). The student, in eval mode, with a
KV cache and left-padded prompts, continues each prompt until the tokenizer's EOS or the template's end-of-turn
token (kept: it is trained, as a dataset answer's end-of-turn marker is) or ``max_new_tokens``. Sampling draws from
one generator per row, seeded by (seed, optimizer step, row id): a row's answer does not depend on the rows beside
it (accumulation splits give the same answers) and a resumed run draws what the uninterrupted one drew, with no
generator state to restore beyond the step the checkpoint holds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .data.tokenize import encode_messages
from .errors import ConfigError, DataError
from .losses.contract import IGNORE_INDEX

ROLLOUT = "rollout"  # the key that marks a batch of the student's own answers (no teacher row was fetched ahead)
ROLLOUT_LOG_PROBS = "rollout_log_probs"  # (B, T): the engine's log p (T = 1) of each answer label, NaN elsewhere
_PROBE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]


@dataclass(frozen=True)
class RolloutSettings:
    max_new_tokens: int = 128  # an answer stops after this many tokens (counted as cut)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass kept before sampling
    seed: int = 0  # the run's seed

    @classmethod
    def from_args(cls, args) -> RolloutSettings:
        return cls(args.rollout_max_new_tokens, args.rollout_temperature, args.rollout_top_p, args.seed)


@dataclass
class RolloutStats:
    """What the rollouts since the last log cost and produced."""

    seconds: float = 0.0
    tokens: int = 0
    answers: int = 0
    cut: int = 0  # answers stopped by max_new_tokens, not by a stop token
    logprob_gap: float | None = None  # largest |log p_engine - log p_trainer| over the sampled tokens trained on

    def figures(self) -> dict:
        figures = {"rollout_s": round(self.seconds, 4), "rollout_tokens": self.tokens}
        if self.answers:
            figures["rollout_cut"] = round(self.cut / self.answers, 4)
            figures["rollout_tokens_per_s"] = round(self.tokens / max(self.seconds, 1e-9), 1)
        if self.logprob_gap is not None:
            figures["rollout_logprob_gap"] = float(f"{self.logprob_gap:.4g}")
        return figures

    def observe_gap(self, gap: float) -> None:
        """Keep the largest gap; a NaN (an engine log-probability missing) is kept over any number: it must show."""
        before = self.logprob_gap
        self.logprob_gap = gap if before is None else math.nan if math.isnan(before) or math.isnan(gap) else max(before, gap)


def stop_token_ids(tokenizer) -> set[int]:
    """EOS and the special tokens the chat template puts at the end of an assistant turn (its labelled tail)."""
    special = set(tokenizer.all_special_ids) | {index for index, token in tokenizer.added_tokens_decoder.items()
                                                 if token.special}
    input_ids, labels = encode_messages(tokenizer, _PROBE, 10**6)
    stops = {token for token, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX and token in special}
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    if not stops:
        raise ConfigError("on-policy rollouts need a stop token: the tokenizer has no EOS and its chat template ends "
                          "an answer with no special token")
    return stops


def answer_stop_ids(model, tokenizer) -> list[int]:
    """Where a greedy answer ends: the rollouts' stops (EOS, the chat template's end-of-turn token) and the model's
    own generation config's stop ids."""
    try:
        stops = stop_token_ids(tokenizer)
    except ConfigError:  # no EOS and no end-of-turn token: only the generation config can stop it
        stops = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops |= set(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
    return sorted(stops)


def padding_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def last_prompt(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
    """One padded row's tokens before its last labelled answer."""
    labelled = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    start = labelled[-1]
    while start - 1 >= 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    real = attention_mask[:start].bool() if attention_mask is not None else torch.ones(start, dtype=torch.bool)
    return input_ids[:start][real].tolist()


def model_positions(model) -> int | None:
    """How many positions (prompt and answer together) the model reads, where its config says."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def row_seed(seed: int, step: int, row_id: int) -> int:
    return ((seed * 1_000_003 + step) * 1_000_033 + row_id) % (2**63 - 1)


class Rollouts:
    """Answers of the student to a batch's prompts, as a training batch whose labels are the answers; ``engine``
    (rollout_engines.py) generates them, by default in this process with transformers."""

    def __init__(self, settings: RolloutSettings, tokenizer, engine=None):
        from .rollout_engines import TransformersEngine  # the engines import this module's helpers

        self.settings = settings
        self.pad_id = padding_id(tokenizer)
        self.engine = engine or TransformersEngine(settings, stop_token_ids(tokenizer), self.pad_id)
        self.stats = RolloutStats()

    def batch(self, model, inputs: dict, step: int) -> dict:
        """The on-policy batch of ``inputs``: each row's prompt followed by the student's answer (labelled)."""
        started = time.perf_counter()
        mask = inputs.get("attention_mask")
        prompts = [last_prompt(inputs["input_ids"][b], inputs["labels"][b], None if mask is None else mask[b])
                   for b in range(inputs["input_ids"].shape[0])]
        row_ids = inputs["row_id"].tolist() if "row_id" in inputs else list(range(len(prompts)))
        for prompt, row in zip(prompts, row_ids, strict=True):
            if not prompt:
                raise DataError(f"training row {row} has no prompt before its answer: on-policy steps need rows "
                                "with a prompt for the student to answer")
        was_training = model.training
        model.eval()
        try:
            answers = self.answers(model, prompts, [row_seed(self.settings.seed, step, r) for r in row_ids])
        finally:
            model.train(was_training)
        self.stats.seconds += time.perf_counter() - started
        self.stats.tokens += sum(len(answer) for answer in answers.tokens)
        self.stats.answers += len(answers.tokens)
        self.stats.cut += sum(answers.cut)
        return self.as_batch(prompts, answers, inputs)

    def answers(self, model, prompts: list[list[int]], seeds: list[int]):
        """The engine's answers (stop token included), each cut at the budget the model's positions leave."""
        width = max(len(prompt) for prompt in prompts)
        limits = [limit for limit in (model_positions(model), self.engine.positions()) if limit is not None]
        budget = min([self.settings.max_new_tokens, *(limit - width for limit in limits)])
        if budget < 1:
            raise ConfigError(f"an on-policy prompt of {width} tokens leaves no room for an answer in the "
                              f"model's {min(limits)} positions: lower --max_length")
        return self.engine.generate(model, prompts, seeds, budget)

    def generate(self, model, prompts: list[list[int]], seeds: list[int]) -> tuple[list[list[int]], list[bool]]:
        """Each prompt's answer (stop token included) and whether it was cut at the token budget."""
        answers = self.answers(model, prompts, seeds)
        return answers.tokens, answers.cut

    def as_batch(self, prompts: list[list[int]], answers, inputs: dict) -> dict:
        """``inputs`` with each row replaced by its prompt followed by its answer (labelled), right-padded, and the
        engine's log-probability of each answer token beside its label."""
        device = inputs["input_ids"].device
        width = max(len(p) + len(a) for p, a in zip(prompts, answers.tokens, strict=True))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        log_probs = torch.full(ids.shape, float("nan"))
        for b, (prompt, answer) in enumerate(zip(prompts, answers.tokens, strict=True)):
            row = prompt + answer
            ids[b, :len(row)] = torch.tensor(row)
            labels[b, len(prompt):len(row)] = torch.tensor(answer)
            log_probs[b, len(prompt):len(row)] = torch.tensor(answers.log_probs[b], dtype=torch.float32)
            mask[b, :len(row)] = 1
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
                 ROLLOUT: torch.ones(len(prompts), dtype=torch.bool, device=device),
                 ROLLOUT_LOG_PROBS: log_probs.to(device)}
        if "row_id" in inputs:
            batch["row_id"] = inputs["row_id"]
        return batch
