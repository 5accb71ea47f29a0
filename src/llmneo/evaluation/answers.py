"""Answers people can read: greedy continuations of prompts, and a few held-out prompts answered by the teacher
and by the student before and after training (written into a run's report.md)."""

from __future__ import annotations

import torch

from ..losses.contract import IGNORE_INDEX
from ..rollouts import answer_stop_ids


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(1, T) token ids of one user turn followed by the assistant's generation prompt."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def continue_greedily(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int = 128,
                      stops: list[int] | None = None) -> str:
    """The model's greedy continuation of ``input_ids`` (1, T), decoded without special tokens; it ends at
    ``stops`` (default ``answer_stop_ids``: give them when continuing many prompts, to find them once)."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    stops = answer_stop_ids(model, tokenizer) if stops is None else stops
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops or None)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def held_out_prompts(dataset, count: int = 3) -> list[torch.Tensor]:
    """The first ``count`` held-out rows cut before their first answer token: each conversation's opening prompt,
    rendered by the chat template exactly as in training."""
    prompts = []
    for row in dataset.select(range(min(count, len(dataset)))):
        labels = row["labels"]
        first = next((i for i, label in enumerate(labels) if i > 0 and label != IGNORE_INDEX), len(labels))
        prompts.append(torch.tensor([row["input_ids"][:first]]))
    return prompts


def held_out_teacher_prompts(dataset, count: int = 3) -> list[torch.Tensor]:
    """Across tokenizers: the same rows in the teacher's own tokens, cut after its first aligned position (the
    last prompt token, whose logits predict the answer's first token)."""
    prompts = []
    for row in dataset.select(range(min(count, len(dataset)))):
        aligned = row["aligned_teacher"]
        ids = row["teacher_input_ids"][: aligned[0] + 1] if aligned else row["teacher_input_ids"]
        prompts.append(torch.tensor([ids]))
    return prompts


def answers(model, tokenizer, prompts: list[torch.Tensor], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers of ``model`` (put in eval mode for the call) to token-id prompts."""
    was_training = model.training
    model.eval()
    try:
        stops = answer_stop_ids(model, tokenizer)
        return [continue_greedily(model, tokenizer, ids, max_new_tokens, stops) for ids in prompts]
    finally:
        model.train(was_training)
