"""Rollout engines: what generates the student's answers on on-policy steps. Each engine samples with the run's
settings (temperature, top-p, per-row seeds, the stop tokens kept) and returns, beside each answer, its own
log-probability (T = 1) of every token it sampled, which the trainer compares with its recomputation
(``rollout_logprob_gap``).

- ``TransformersEngine``: the trainer's own model, in its process (KV cache, left padding).
- ``ServedEngine``: a vLLM server of the student's base with LoRA on. Before a step's rollouts the current adapter
  is written (a plain PEFT LoRA, written whole before it is named) to a directory the server reads, and loaded in
  place under one name; then every prompt of the micro-batch is in flight at once, each with its seed. Only the
  adapter moves: the server keeps the base.

The engine is chosen once (``choose_engine``); the trainer never asks which one it has.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters.lora import mutates_base
from .adapters.store import write_serving_adapter
from .errors import ConfigError, RolloutServerError
from .rollouts import RolloutSettings, padding_id, stop_token_ids
from .runtime.layout import INITIAL_ADAPTER_DIR
from .server_client import JsonClient, ServerSettings

logger = logging.getLogger(__name__)


@dataclass
class Answers:
    """The engine's answers to a list of prompts, in order."""

    tokens: list[list[int]]  # each answer, its stop token included
    cut: list[bool]  # stopped by the token budget, not by a stop token
    log_probs: list[list[float]]  # the engine's log p (T = 1) of each answer token


class RolloutEngine(ABC):
    """Generates answers with the student as it is at the current step."""

    def __init__(self, settings: RolloutSettings, stops: set[int]):
        self.settings, self.stops = settings, stops

    def start(self, model) -> None:
        """Checks before training (a served engine refuses what it cannot serve here, in one line)."""
        return None

    def before_step(self, model, step: int) -> None:
        """Called before the rollouts of on-policy optimizer step ``step``."""
        return None

    def positions(self) -> int | None:
        """Positions (prompt and answer) the engine itself can hold, where it has a limit of its own."""
        return None

    @abstractmethod
    def generate(self, model, prompts: list[list[int]], seeds: list[int], budget: int) -> Answers:
        """Each prompt's answer of at most ``budget`` tokens, row b sampled from a generator seeded ``seeds[b]``."""

    def figures(self) -> dict:
        """The engine's own figures since the last log (then counting starts again)."""
        return {}


class TransformersEngine(RolloutEngine):
    """The trainer's model generates, one token per forward with a KV cache over left-padded prompts."""

    def __init__(self, settings: RolloutSettings, stops: set[int], pad_id: int):
        super().__init__(settings, stops)
        self.pad_id = pad_id

    @torch.no_grad()
    def generate(self, model, prompts: list[list[int]], seeds: list[int], budget: int) -> Answers:
        device = next(model.parameters()).device
        width = max(len(prompt) for prompt in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for b, prompt in enumerate(prompts):  # left padding: every prompt ends at the last column
            ids[b, width - len(prompt):] = torch.tensor(prompt, device=device)
            mask[b, width - len(prompt):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        answers, log_probs, done = [[] for _ in prompts], [[] for _ in prompts], [False] * len(prompts)
        next_position = positions[:, -1:] + 1
        for step in range(budget):
            logits = out.logits[:, -1].float()
            tokens = self._pick(logits, generators)
            sampled = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
            for b, (token, log_prob) in enumerate(zip(tokens.tolist(), sampled.tolist(), strict=True)):
                if not done[b]:
                    answers[b].append(token)
                    log_probs[b].append(log_prob)
                    done[b] = token in self.stops
            if all(done) or step == budget - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position,
                        use_cache=True, logits_to_keep=1, **_kv_cache(out))
            next_position = next_position + 1
        return Answers(answers, [not finished for finished in done], log_probs)

    def _pick(self, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        if self.settings.temperature == 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / self.settings.temperature, dim=-1)
        if self.settings.top_p < 1:
            probs = nucleus(probs, self.settings.top_p)
        return torch.cat([torch.multinomial(probs[b], 1, generator=generator)
                          for b, generator in enumerate(generators)])


def _kv_cache(outputs) -> dict:
    """The KV cache of ``outputs`` as the next forward call takes it: ``cache`` since transformers 5.2x,
    ``past_key_values`` before (each version's output field has its argument's name)."""
    name = "cache" if "cache" in outputs else "past_key_values"
    return {name: outputs[name]}


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of most likely tokens whose mass reaches ``top_p`` (at least the top one), renormalised."""
    ordered, order = probs.sort(dim=-1, descending=True)
    outside = ordered.cumsum(dim=-1) - ordered >= top_p
    ordered = ordered.masked_fill(outside, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, ordered)
    return kept / kept.sum(dim=-1, keepdim=True)


# ---- the served engine ----------------------------------------------------------------------------------------------

# Largest |log p_server - log p_student| over the probe's tokens at start still read as the student's base with its
# adapter (bf16 on a GPU moves them by a few hundredths; another base by whole nats). The finer signal is the
# per-step rollout_logprob_gap.
BASE_TOLERANCE = 0.5
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts
REQUESTS_IN_FLIGHT = 64  # one request per prompt: a micro-batch's prompts are all in flight at once


@dataclass
class AdapterSync:
    """Where and how often the current adapter is sent to the rollout server."""

    directory: Path  # --rollout_adapter_dir: the server must read it (a shared filesystem for a remote server)
    every: int = 1  # --rollout_sync_steps: on-policy steps between syncs
    initial_dir: Path | None = None  # PiSSA/OLoRA: the untrained adapter the served form is converted against
    name: str = "student"  # the adapter's name on the server
    last_step: int | None = None  # the optimizer step of the adapter the server holds
    seconds: float = 0.0
    bytes: int = 0
    staleness: list[int] = field(default_factory=list)


class ServedEngine(RolloutEngine):
    """A vLLM server (OpenAI API, LoRA on, runtime adapter updates on) generates with the synced adapter."""

    def __init__(self, settings: RolloutSettings, stops: set[int], server: ServerSettings, sync: AdapterSync):
        super().__init__(settings, stops)
        self.server, self.sync = server, sync
        self.base_url = server.url.rstrip("/")
        self.client = JsonClient(server, RolloutServerError)
        self.max_model_len: int | None = None
        self.pool = ThreadPoolExecutor(REQUESTS_IN_FLIGHT, thread_name_prefix="llmneo-rollouts")

    # ---- at start: the server, the adapter, the base ---------------------------------------------------------------

    def start(self, model) -> None:
        self._find_base()
        self._first_sync(model)
        self._check_base(model)

    def _find_base(self) -> None:
        base = self.client.served_model(self.base_url, "base models", keep=lambda entry: not entry.get("parent"))
        self.server.model, self.max_model_len = base["id"], base.get("max_model_len")

    def _first_sync(self, model) -> None:
        try:
            self._sync(model, step=None, tries=1)  # vLLM answers a refused adapter with a 500: not worth retrying
        except RolloutServerError as error:
            raise ConfigError(self._refusal(error, model)) from None

    def _refusal(self, error: RolloutServerError, model) -> str:
        """What the server's refusal of the first adapter means, and the server flag or variable that fixes it."""
        reason, where = error.reason, f"rollout server {self.server.url}"
        lowered = reason.lower()
        if error.status == 404 and "adapter" not in lowered and "lora" not in lowered:
            return (f"{where} does not take adapters at run time: start vLLM with the environment variable "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (scripts/vllm_cpu_server.sh serve-student sets it)")
        if "max_lora_rank" in lowered:
            rank = served_rank(model)
            allowed = next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])
            return (f"the adapter's rank {rank} is above {where}'s --max-lora-rank: restart vLLM with "
                    f"--max-lora-rank {allowed}, or lower --lora_r ({reason})")
        if "lora" in lowered and ("not enabled" in lowered or "enable-lora" in lowered or "enable_lora" in lowered):
            return f"{where} has LoRA off: start vLLM with --enable-lora ({reason})"
        return f"{where} refused the student's adapter: {reason}"

    def _check_base(self, model) -> None:
        """The served base with the synced adapter must give the student's own log-probabilities of a probe."""
        probe = _probe_ids(model)
        served = self._prompt_log_probs(probe)
        ours = _own_log_probs(model, probe)
        gap = max(abs(a - b) for a, b in zip(served, ours, strict=True))
        if not gap <= BASE_TOLERANCE:
            raise ConfigError(
                f"rollout server {self.server.url} ('{self.server.model}') is not the student's base: with the "
                f"student's adapter its log-probabilities of a probe differ from the student's by up to {gap:.3g} "
                f"(tolerance {BASE_TOLERANCE}); serve the student's base model there (--rollout_server_model names "
                "it when the server has several)")

    def _prompt_log_probs(self, ids: list[int]) -> list[float]:
        answer = self.client.request("POST", f"{self.base_url}/completions", {
            "model": self.sync.name, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 1})
        positions = answer["choices"][0]["prompt_logprobs"][1:]
        return [float(entry[str(token)]["logprob"]) for entry, token in zip(positions, ids[1:], strict=True)]

    # ---- each step ---------------------------------------------------------------------------------------------------

    def before_step(self, model, step: int) -> None:
        if self.sync.last_step is None or step - self.sync.last_step >= self.sync.every:
            self._sync(model, step)
        self.sync.staleness.append(step - self.sync.last_step)

    def _sync(self, model, step: int | None, tries: int | None = None) -> None:
        """Write the current adapter as a plain LoRA into a new directory, then load it in place under one name."""
        started = time.perf_counter()
        target = self.sync.directory / (f"step-{step:07d}" if step is not None else "start")
        shutil.rmtree(target, ignore_errors=True)  # ours: a resumed run writes that step again
        self.sync.bytes += write_serving_adapter(model, target, self.sync.initial_dir)
        self.client.request("POST", f"{self.base_url}/load_lora_adapter",
                            {"lora_name": self.sync.name, "lora_path": str(target.resolve()), "load_inplace": True},
                            tries=tries, text=True)
        for older in self.sync.directory.iterdir():  # the server holds the adapter now; one copy is kept
            if older != target and older.is_dir():
                shutil.rmtree(older, ignore_errors=True)
        self.sync.seconds += time.perf_counter() - started
        self.sync.last_step = step if step is not None else 0

    def positions(self) -> int | None:
        return self.max_model_len

    def generate(self, model, prompts: list[list[int]], seeds: list[int], budget: int) -> Answers:
        requests = [self._request(prompt, seed, budget) for prompt, seed in zip(prompts, seeds, strict=True)]
        answered = list(self.pool.map(self._complete, requests))
        return Answers([a[0] for a in answered], [a[1] for a in answered], [a[2] for a in answered])

    def _request(self, prompt: list[int], seed: int, budget: int) -> dict:
        # ignore_eos with the stop ids: the server stops where the transformers engine does, stop token kept
        return {"model": self.sync.name, "prompt": prompt, "max_tokens": budget, "temperature":
                self.settings.temperature, "top_p": self.settings.top_p, "seed": seed, "logprobs": 0,
                "return_tokens_as_token_ids": True, "stop_token_ids": sorted(self.stops), "ignore_eos": True,
                "skip_special_tokens": False}

    def _complete(self, request: dict) -> tuple[list[int], bool, list[float]]:
        answer = self.client.request("POST", f"{self.base_url}/completions", request)
        try:
            choice = answer["choices"][0]
            tokens = [int(token.removeprefix("token_id:")) for token in choice["logprobs"]["tokens"]]
            log_probs = [math.nan if value is None else float(value) for value in choice["logprobs"]["token_logprobs"]]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise RolloutServerError(f"rollout server {self.server.url} answered without the sampled token ids and "
                                     "their log-probabilities (is it vLLM?)") from None
        cut = choice.get("finish_reason") == "length" and not (tokens and tokens[-1] in self.stops)
        return tokens, cut, log_probs

    def figures(self) -> dict:
        staleness = self.sync.staleness
        figures = {"rollout_sync_s": round(self.sync.seconds, 4), "rollout_adapter_bytes": self.sync.bytes,
                   **({"rollout_staleness": max(staleness)} if staleness else {})}
        self.sync.seconds, self.sync.bytes, self.sync.staleness = 0.0, 0, []
        return figures


def served_rank(model) -> int:
    """The rank of the adapter as served: PiSSA/OLoRA's converted form has twice the trained rank."""
    config = model.peft_config["default"]
    return max([config.r, *(config.rank_pattern or {}).values()]) * (2 if mutates_base(config) else 1)


def _probe_ids(model) -> list[int]:
    """A fixed sequence of ids across the vocabulary (the probe needs no text: the server reads ids)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (32,), generator=generator).tolist()


@torch.no_grad()
def _own_log_probs(model, ids: list[int]) -> list[float]:
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        tensor = torch.tensor([ids], device=device)
        logits = model(input_ids=tensor, use_cache=False).logits[0, :-1].float()
    finally:
        model.train(was_training)
    return torch.log_softmax(logits, dim=-1).gather(1, tensor[0, 1:, None]).squeeze(1).tolist()


def choose_engine(args, tokenizer) -> RolloutEngine:
    """The run's rollout engine: a vLLM server with --rollout_server, else the trainer's own model."""
    settings, stops = RolloutSettings.from_args(args), stop_token_ids(tokenizer)
    if not args.rollout_server:
        return TransformersEngine(settings, stops, padding_id(tokenizer))
    if args.world_size > 1:
        raise ConfigError("rollout_server runs with one training process (each process would sync its own adapter "
                          "under one name): launch one process")
    run_dir = Path(args.output_dir)
    directory = Path(args.rollout_adapter_dir or run_dir / "rollout-adapter").expanduser().absolute()
    directory.mkdir(parents=True, exist_ok=True)
    initial = run_dir / INITIAL_ADAPTER_DIR
    name = "llmneo-" + hashlib.sha256(os.fsencode(run_dir.absolute())).hexdigest()[:12]  # one per run directory
    sync = AdapterSync(directory, args.rollout_sync_steps, initial if initial.is_dir() else None, name)
    return ServedEngine(settings, stops, ServerSettings.from_config(args, "rollout_server"), sync)
