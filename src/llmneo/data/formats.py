"""Row formats: detect a dataset's format from its columns and turn one row into chat messages.

Supported formats:
- ``sharegpt``: ``conversations: [{from: human|gpt|system, value}]`` (ShareGPT, BAAI Infinity-Instruct);
- ``openai``: ``messages: [{role: system|user|assistant, content}]``;
- ``prompt_completion``: ``prompt`` (user turn), ``completion`` (assistant answer), optional ``system``;
- ``prompt``: ``prompt`` alone, a user turn or a conversation of messages (TRL's on-policy datasets): the answer is
  the student's own, so these rows train on-policy steps only (``--on_policy_fraction 1``);
- ``text``: plain ``text``; every token is trained on;
- ``classification``: ``text`` and ``label`` (with ``--task classification``; see classification.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import DataError


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


def detect_format(columns: Iterable[str], source: str) -> str:
    columns = {c for c in columns if not c.startswith("_")}  # _source/_row/_json_values are ours
    if "conversations" in columns:
        return "sharegpt"
    if "messages" in columns:
        return "openai"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "prompt" in columns:
        return "prompt"
    if "text" in columns:
        return "text"
    raise DataError(
        f"cannot detect the row format from columns {sorted(columns)}; expected 'conversations', 'messages', "
        "'prompt'+'completion', 'prompt' or 'text' (or set --data_format)",
        source=source,
    )


def required_columns(fmt: str) -> tuple[str, ...]:
    return {"sharegpt": ("conversations",), "openai": ("messages",), "prompt_completion": ("prompt", "completion"),
            "prompt": ("prompt",),
            "text": ("text",), "classification": ("text", "label")}[fmt]


def row_to_messages(row: dict, fmt: str) -> list[dict[str, str]]:
    """Messages ``[{role, content}]`` of one row; raises DataError naming the field (source/row filled by caller)."""
    if fmt == "sharegpt":
        return _turns(row, "conversations", "from", "value", SHAREGPT_ROLES)
    if fmt == "openai":
        return _turns(row, "messages", "role", "content", OPENAI_ROLES)
    if fmt == "prompt_completion":
        return _prompt_completion(row)
    if fmt == "prompt":
        return _prompt_only(row)
    raise ValueError(f"format {fmt} has no messages")


def row_to_text(row: dict) -> str:
    text = row.get("text")
    if not isinstance(text, str):
        raise DataError(_type_message(text, "a string"), field="text")
    if not text.strip():
        raise DataError("empty text", field="text")
    return text


def _type_message(value, expected: str) -> str:
    if value is None:
        return "missing"
    return f"expected {expected}, got {type(value).__name__}"


def _turns(row: dict, key: str, role_key: str, content_key: str, roles: dict[str, str],
           needs_answer: bool = True) -> list[dict[str, str]]:
    turns = row.get(key)
    if not isinstance(turns, list):
        raise DataError(_type_message(turns, "a list of turns"), field=key)
    if not turns:
        raise DataError("empty conversation", field=key)
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(_type_message(turn, "an object"), field=where)
        role, content = turn.get(role_key), turn.get(content_key)
        if not isinstance(role, str):
            raise DataError(_type_message(role, "a string"), field=f"{where}.{role_key}")
        if role not in roles:
            raise DataError(f"unknown role '{role}' (expected one of {sorted(roles)})", field=f"{where}.{role_key}")
        if not isinstance(content, str):
            raise DataError(_type_message(content, "a string"), field=f"{where}.{content_key}")
        messages.append({"role": roles[role], "content": content})
    if needs_answer and not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError("no assistant answer to train on", field=key)
    return messages


def _prompt_only(row: dict) -> list[dict[str, str]]:
    """The prompt (a user turn, or a conversation ending with one) and an empty assistant turn: the chat template
    renders the answer's opening, the student's rollout fills it, and the turn's end marks where it starts."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError("empty prompt", field="prompt")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = _turns({"prompt": prompt}, "prompt", "role", "content", OPENAI_ROLES, needs_answer=False)
        if messages[-1]["role"] != "user":
            raise DataError(f"the prompt must end with a user turn, not {messages[-1]['role']}", field="prompt")
    return [*messages, {"role": "assistant", "content": ""}]


def _prompt_completion(row: dict) -> list[dict[str, str]]:
    messages = []
    system = row.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise DataError(_type_message(system, "a string"), field="system")
        messages.append({"role": "system", "content": system})
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = row.get(key)
        if not isinstance(value, str):
            raise DataError(_type_message(value, "a string"), field=key)
        messages.append({"role": role, "content": value})
    if not messages[-1]["content"].strip():
        raise DataError("no assistant answer to train on", field="completion")
    return messages
