"""On-policy rollouts: the student answers each training row's last prompt with its current adapter.

A row's prompt is its conversation up to its last assistant answer (the tokens before that answer's labels: the
chat template's rendering with the generation prompt, as the data side cut it). The student, in eval mode, with a
KV cache and left-padded prompts, continues each prompt until the tokenizer's EOS or the template's end-of-turn
token (kept: it is trained, as a dataset answer's end-of-turn marker is) or ``max_new_tokens``. Sampling draws from
one generator per row, seeded by (seed, optimizer step, row id): a row's answer does not depend on the rows beside
it (accumulation splits give the same answers) and a resumed run draws what the uninterrupted one drew, with no
generator state to restore beyond the step the checkpoint holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .data.tokenize import encode_messages
from .errors import ConfigError, DataError
from .losses.contract import IGNORE_INDEX

ROLLOUT = "rollout"  # the key that marks a batch of the student's own answers (no teacher row was fetched ahead)
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

    def figures(self) -> dict:
        figures = {"rollout_s": round(self.seconds, 4), "rollout_tokens": self.tokens}
        if self.answers:
            figures["rollout_cut"] = round(self.cut / self.answers, 4)
        return figures


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
    """Answers of the student to a batch's prompts, as a training batch whose labels are the answers."""

    def __init__(self, settings: RolloutSettings, tokenizer):
        self.settings = settings
        self.stops = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
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
            answers, cut = self.generate(model, prompts, [row_seed(self.settings.seed, step, r) for r in row_ids])
        finally:
            model.train(was_training)
        self.stats.seconds += time.perf_counter() - started
        self.stats.tokens += sum(len(answer) for answer in answers)
        self.stats.answers += len(answers)
        self.stats.cut += sum(cut)
        return self.as_batch(prompts, answers, inputs)

    @torch.no_grad()
    def generate(self, model, prompts: list[list[int]], seeds: list[int]) -> tuple[list[list[int]], list[bool]]:
        """Each prompt's answer (stop token included) and whether it was cut at the token budget."""
        device = next(model.parameters()).device
        width = max(len(prompt) for prompt in prompts)
        budget, positions = self.settings.max_new_tokens, model_positions(model)
        if positions is not None:
            budget = min(budget, positions - width)
            if budget < 1:
                raise ConfigError(f"an on-policy prompt of {width} tokens leaves no room for an answer in the "
                                  f"model's {positions} positions: lower --max_length")
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for b, prompt in enumerate(prompts):  # left padding: every prompt ends at the last column
            ids[b, width - len(prompt):] = torch.tensor(prompt, device=device)
            mask[b, width - len(prompt):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        answers, done = [[] for _ in prompts], [False] * len(prompts)
        next_position = positions[:, -1:] + 1
        for step in range(budget):
            tokens = self._pick(out.logits[:, -1].float(), generators)
            for b, token in enumerate(tokens.tolist()):
                if not done[b]:
                    answers[b].append(token)
                    done[b] = token in self.stops
            if all(done) or step == budget - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position,
                        use_cache=True, logits_to_keep=1, **_kv_cache(out))
            next_position = next_position + 1
        return answers, [not finished for finished in done]

    def _pick(self, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        if self.settings.temperature == 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / self.settings.temperature, dim=-1)
        if self.settings.top_p < 1:
            probs = _nucleus(probs, self.settings.top_p)
        return torch.cat([torch.multinomial(probs[b], 1, generator=generator)
                          for b, generator in enumerate(generators)])

    def as_batch(self, prompts: list[list[int]], answers: list[list[int]], inputs: dict) -> dict:
        """``inputs`` with each row replaced by its prompt followed by ``answers`` (labelled), right-padded."""
        device = inputs["input_ids"].device
        width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for b, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            row = prompt + answer
            ids[b, :len(row)] = torch.tensor(row)
            labels[b, len(prompt):len(row)] = torch.tensor(answer)
            mask[b, :len(row)] = 1
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
                 ROLLOUT: torch.ones(len(prompts), dtype=torch.bool, device=device)}
        if "row_id" in inputs:
            batch["row_id"] = inputs["row_id"]
        return batch


def _kv_cache(outputs) -> dict:
    """The KV cache of ``outputs`` as the next forward call takes it: ``cache`` since transformers 5.2x,
    ``past_key_values`` before (each version's output field has its argument's name)."""
    name = "cache" if "cache" in outputs else "past_key_values"
    return {name: outputs[name]}


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of most likely tokens whose mass reaches ``top_p`` (at least the top one), renormalised."""
    ordered, order = probs.sort(dim=-1, descending=True)
    outside = ordered.cumsum(dim=-1) - ordered >= top_p
    ordered = ordered.masked_fill(outside, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, ordered)
    return kept / kept.sum(dim=-1, keepdim=True)
