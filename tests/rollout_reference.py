"""The references both rollout engines are held to (tests/unit/test_rollout_engines.py for the transformers engine,
tests/e2e/test_rollout_server.py for the vLLM one), written without llm-neo's sampling code; and a rollout batch of
given answers (``answered_rows``) for the on-policy loss references."""

from __future__ import annotations

import torch

from llmneo.losses.contract import IGNORE_INDEX
from llmneo.rollout_engines import Answers
from llmneo.rollouts import last_prompt


@torch.no_grad()
def full_forward_log_probs(model, prompt: list[int], answer: list[int]) -> list[float]:
    """log p(answer[t] | prompt, answer[:t]) at T = 1 from one forward over the whole row, no cache, no padding."""
    ids = torch.tensor([prompt + answer], device=next(model.parameters()).device)
    logits = model(input_ids=ids, use_cache=False).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    return [log_probs[len(prompt) - 1 + t, token].item() for t, token in enumerate(answer)]


def nucleus_set(probs: list[float], top_p: float) -> set[int]:
    """The tokens sampling at ``top_p`` may draw: by falling probability, every token whose predecessors' mass is
    still below p (so the one that crosses p is kept, and the top token always)."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for index in order:
        if mass >= top_p and kept:
            break
        kept.add(index)
        mass += probs[index]
    return kept


def stop_kept(answer: list[int], stops: set[int]) -> bool:
    """An answer that stopped ends with its stop token and holds no earlier one."""
    return bool(answer) and answer[-1] in stops and not any(token in stops for token in answer[:-1])


def answered_rows(trainer, rows: list[dict]) -> tuple[dict, list[list[int]], list[list[int]]]:
    """A rollout batch whose answers are each row's own last answer (text a random tiny student would not sample:
    its greedy answers are mostly stray bytes, which share no text with another tokenizer past the first)."""
    prompts, answers, stops = [], [], trainer.on_policy.rollouts.engine.stops
    for row in rows:
        ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
        prompts.append(last_prompt(ids, labels, None))
        answer = [token for token in labels[len(prompts[-1]):].tolist() if token != IGNORE_INDEX]
        answers.append(answer[:next((i for i, token in enumerate(answer) if token in stops), len(answer) - 1) + 1])
    answered = Answers(answers, [False] * len(answers), [[0.0] * len(answer) for answer in answers])
    batch = trainer.on_policy.rollouts.as_batch(prompts, answered, trainer.data_collator(rows))
    return batch, prompts, answers
