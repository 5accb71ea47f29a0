"""A teacher served by an OpenAI-compatible inference server (vLLM): the client, its checks and its fingerprint.

The server scores the student's own token ids: ``/v1/completions`` with the ids as ``prompt``, ``max_tokens: 1``
and ``prompt_logprobs: k`` returns, for every prompt position after the first, the top-k log-probabilities (at
T = 1) of the token that follows. Entry t + 1 is the teacher's prediction at position t, the one the KD term
compares at an answer position t. The rows come back as the offline cache holds them (losses/topk.py): the k ids
and log-probabilities by rank and the log of the mass outside them, so temperature and the tail bucket are applied
by the same code.

Before any model loads, ``TeacherServer.connect`` checks what a served teacher can be checked for: that it answers,
which model it serves, that its tokenizer is the student's (``/tokenize`` of a probe covering the chat template's
special tokens, and ``/detokenize`` of ids across the vocabulary), and that it returns k log-probabilities.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass

import torch

from ..errors import ConfigError, TeacherServerError, VocabularyError
from ..server_client import JsonClient, ServerSettings
from ..losses.contract import IGNORE_INDEX
from ..losses.topk import TopKRows

logger = logging.getLogger(__name__)

# A conversation whose rendering covers the chat template's special tokens, and plain text around them.
PROBE_MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Name three colours of the sea, and why."},
                  {"role": "assistant", "content": "Blue, green and grey: the sky and the depth decide."}]
PROBE_TOP_K = 4  # log-probabilities per probe position in the fingerprint
# What a served log-probability may be off by and still be taken (float32 rounding on the server): a value above
# LOG_PROB_TOLERANCE, top-k probabilities summing past 1 + MASS_TOLERANCE, or a rank whose value exceeds the rank
# before it by more than RANK_TOLERANCE is refused.
LOG_PROB_TOLERANCE = 1e-4
MASS_TOLERANCE = 1e-3
RANK_TOLERANCE = 1e-4


class TeacherServer:
    """One served teacher model: top-k log-probabilities of token-id sequences (requests retried: server_client.py)."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.client = JsonClient(settings, TeacherServerError)
        self._request = self.client.request
        self.base = settings.url.rstrip("/")
        self.root = self.base.removesuffix("/v1")  # vLLM serves /tokenize and /detokenize beside /v1
        self.model = settings.model
        self.probe_ids: list[int] = []  # the student's tokens of the probe (set by connect)

    # ---- checks at start ---------------------------------------------------------------------------------------

    @classmethod
    def open(cls, settings: ServerSettings, tokenizer, top_k: int, option: str) -> tuple[TeacherServer, dict]:
        """The served teacher, checked (connect, and ``top_k`` log-probabilities per position, ``option`` naming
        where k came from), and its fingerprint: what a run and a cache capture both start with."""
        server = cls(settings).connect(tokenizer)
        fingerprint = server.fingerprint()
        server.check_top_k(top_k, option)
        return server, fingerprint

    def connect(self, tokenizer) -> TeacherServer:
        """Check, before any model loads, that the server answers, serves one (or the named) model and has the
        student's tokenizer. A server that does not answer is named in one line: it is not retried."""
        self.model = self.client.served_model(self.base)["id"]
        self.check_tokenizer(tokenizer)
        self.probe_ids = tokenizer(probe_text(tokenizer), add_special_tokens=False)["input_ids"]
        return self

    def check_tokenizer(self, tokenizer) -> None:
        """The server must read the student's ids as the student does: same ids for the probe text (chat template
        and its special tokens included) and the same text for ids across the vocabulary."""
        text = probe_text(tokenizer)
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        theirs = self._request("POST", f"{self.root}/tokenize",
                               {"model": self.model, "prompt": text, "add_special_tokens": False})["tokens"]
        size = len(tokenizer)
        special = set(tokenizer.all_special_ids)
        spread = [i for i in [*range(0, size, max(size // 64, 1)), size - 1] if i not in special]
        if ours == theirs:
            decoded = self._request("POST", f"{self.root}/detokenize", {"model": self.model, "tokens": spread})
            if decoded.get("prompt") == tokenizer.decode(spread):
                return
        raise VocabularyError(f"teacher server {self.settings.url} ({self.model}) has another tokenizer than the "
                              f"student's ({len(ours)} vs {len(theirs)} ids for the same probe text, student "
                              f"vocabulary {size}): a served teacher must share the student's tokenizer; distil "
                              "across tokenizers with a local --teacher_model and --cross_tokenizer")

    def check_top_k(self, k: int, option: str = "--top_k") -> None:
        """Refuse a k the server will not return, naming the server's limit and its flag."""
        try:
            self.prompt_logprobs(self.probe_ids, k)
        except TeacherServerError as error:
            if "max" in error.reason.lower() and "logprobs" in error.reason.lower():
                limit = _max_allowed(error.reason)
                raise ConfigError(f"{option} {k} is more than teacher server {self.settings.url} returns"
                                  f"{f' ({limit})' if limit else ''}: lower {option}, or restart vLLM with "
                                  f"--max-logprobs {k} or more") from None
            raise

    # ---- the fingerprint -----------------------------------------------------------------------------------------

    def fingerprint(self) -> dict:
        """The served model's name and its top log-probabilities over the probe: another model, or other weights
        under the same name, give another fingerprint."""
        return {"server_model": self.model, "probe": self.probe_log_probs()}

    def probe_log_probs(self) -> list:
        positions = self.prompt_logprobs(self.probe_ids, PROBE_TOP_K)
        return [[[int(token), round(value, 4)] for token, value in zip(*_by_rank(entry, PROBE_TOP_K, f"probe "
                                                                                    f"position {t}"), strict=True)]
                for t, entry in enumerate(positions)]

    # ---- scoring -------------------------------------------------------------------------------------------------

    def prompt_logprobs(self, token_ids: list[int], k: int) -> list[dict]:
        """The server's ``prompt_logprobs`` of ``token_ids``: entry t predicts token t + 1."""
        answer = self._request("POST", f"{self.base}/completions",
                               {"model": self.model, "prompt": list(token_ids), "max_tokens": 1, "temperature": 0.0,
                                "prompt_logprobs": k})
        try:
            positions = answer["choices"][0]["prompt_logprobs"]
        except (KeyError, IndexError, TypeError):
            positions = None
        if not isinstance(positions, list):
            raise TeacherServerError(f"teacher server {self.settings.url} answered without prompt_logprobs")
        return positions[1:]

    def row_topk(self, feature: dict, k: int, vocab: int) -> TopKRows:
        """The teacher's top-k at the answer positions of one tokenized training row (``input_ids``, ``labels``,
        ``row_id``), in position order: the rows the cache holds for it."""
        labels = feature["labels"]
        positions = [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]
        return self.topk_rows(list(feature["input_ids"]), positions, k, vocab, feature.get("row_id"))

    def topk_rows(self, input_ids: list[int], positions: list[int], k: int, vocab: int, row) -> TopKRows:
        """The teacher's top-k at ``positions`` of one training row (each predicting the next token), checked:
        a missing position, a non-finite value or an id outside the shared vocabulary names the row and the
        position."""
        if not positions:
            return _empty_rows(k)
        entries = self.prompt_logprobs(input_ids[:max(positions) + 2], k)
        ids, values, actual = [], [], []
        for t in positions:
            where = f"training row {row} at position {t}"
            entry = entries[t] if t < len(entries) else None
            if not entry:
                raise TeacherServerError(f"teacher server {self.settings.url} returned no log-probabilities for {where}")
            top_ids, top_values = _by_rank(entry, k, where)
            actual.append(_actual_token(entry, input_ids[t + 1]))
            if max(top_ids) >= vocab:
                raise TeacherServerError(f"teacher server {self.settings.url} returned token id {max(top_ids)} for "
                                         f"{where}, outside the student's {vocab} ids")
            ids.append(top_ids)
            values.append(top_values)
        log_probs = torch.tensor(values, dtype=torch.float32)
        top = torch.tensor(ids, dtype=torch.int64)
        log_tail = torch.log(-torch.expm1(torch.logsumexp(log_probs, dim=-1).clamp(max=0.0)))
        return ScoredRows(top, log_probs, log_tail, torch.tensor(actual, dtype=torch.float32))


def probe_text(tokenizer) -> str:
    """The fixed probe: the probe conversation through the student's chat template, or plain text without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False)
    return " ".join(message["content"] for message in PROBE_MESSAGES)


def _by_rank(entry, k: int, where: str) -> tuple[list[int], list[float]]:
    """The k most likely ids of one position and their log-probabilities, by rank (the entry also holds the
    actual next token, at whatever rank it has), checked: ranks 1..k once each, every value a log-probability
    (<= 0), values falling with rank, and a top-k mass of at most 1, each within its stated tolerance."""
    ranked = sorted(item for item in _parsed(entry, where) if item[0] <= k)
    if len(ranked) < k:
        raise TeacherServerError(f"the teacher server returned {len(ranked)} of {k} log-probabilities for {where}")
    ranks = [rank for rank, _, _ in ranked]
    if ranks != list(range(1, len(ranks) + 1)):
        raise TeacherServerError(f"the teacher server returned ranks {ranks} for {where}: the top {k} must have "
                                 f"ranks 1..{k}, each once")
    ids, values = [token for _, token, _ in ranked], [value for _, _, value in ranked]
    for rank in range(1, k):
        if values[rank] > values[rank - 1] + RANK_TOLERANCE:
            raise TeacherServerError(f"the teacher server returned log-probability {values[rank]:.6g} at rank "
                                     f"{rank + 1} above {values[rank - 1]:.6g} at rank {rank} for {where}")
    mass = math.fsum(math.exp(value) for value in values)
    if mass > 1 + MASS_TOLERANCE:
        raise TeacherServerError(f"the teacher server's top-{k} probabilities sum to {mass:.6g} for {where}: more "
                                 f"than 1 (tolerance {MASS_TOLERANCE:g})")
    return ids, values


def _parsed(entry, where: str) -> list[tuple[int, int, float]]:
    """(rank, token id, log-probability) of each item of one position's entry, each value checked."""
    if not isinstance(entry, dict):
        raise TeacherServerError(f"the teacher server returned a {type(entry).__name__} where the log-probabilities "
                                 f"of {where} belong (expected an object of token id -> logprob and rank)")
    items = []
    for token, value in entry.items():
        try:
            item = (int(value["rank"]), int(token), float(value["logprob"]))
        except (KeyError, TypeError, ValueError):
            raise TeacherServerError(f"the teacher server returned {json.dumps(value)[:80]} for token {token} at "
                                     f"{where}: expected {{\"logprob\": number, \"rank\": integer}}") from None
        items.append(item)
        _check_log_prob(item[2], item[1], where)
    return items


def _check_log_prob(value: float, token: int, where: str) -> None:
    if not math.isfinite(value):
        raise TeacherServerError(f"the teacher server returned a non-finite log-probability for {where}")
    if value > LOG_PROB_TOLERANCE:
        raise TeacherServerError(f"the teacher server returned log-probability {value:.6g} > 0 for token {token} at "
                                 f"{where}: not a log-probability (tolerance {LOG_PROB_TOLERANCE:g})")


def _actual_token(entry: dict, token: int) -> float:
    """The log-probability of the row's own next token, which vLLM adds to every position's entry (NaN where a
    server does not: only on-policy ``sampled`` steps read it, and they refuse NaN). Checked by ``_by_rank``."""
    found = entry.get(str(token))
    return float(found["logprob"]) if found is not None else math.nan


def _empty_rows(k: int) -> ScoredRows:
    return ScoredRows(torch.zeros((0, k), dtype=torch.int64), torch.zeros((0, k)), torch.zeros(0), torch.zeros(0))


@dataclass
class ScoredRows(TopKRows):
    """Top-k rows plus the teacher's log-probability of each position's actual next token (on-policy sampled)."""

    token_log_probs: torch.Tensor = None


def _max_allowed(message: str) -> str | None:
    """The server's limit from its error message ('... max allowed: 64' or similar), if it names one."""
    found = re.search(r"max(?:imum)? allowed:?\s*(\d+)", message)
    return found.group(1) if found else None
