"""Token ids and labels from messages: the student's chat template, assistant-only labels, truncation.

Assistant answers are located by rendering the conversation prefix by prefix: the answer of turn i spans the
characters between ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i+1])``. Tokens
overlapping such a span are labelled (this includes the template's end-of-turn marker, so the student learns to
stop); every other token gets -100. This works for any template that renders conversations incrementally.
"""

from __future__ import annotations

from ..errors import DataError, NeoError
from ..losses.contract import IGNORE_INDEX, count_answer_tokens

# Used when the student tokenizer has no chat template: role headers, and the EOS token after every answer.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# For a base model (no chat template of its own) as a teacher across tokenizers: conversations as plain prose,
# which it has seen in pre-training, instead of role markers it would try to continue.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + '\n\n' }}"
    "{% else %}{{ 'Question: ' + message['content'] + '\n\nAnswer: ' }}{% endif %}"
    "{% endfor %}"
)


def chat_template_text(template: str) -> str:
    """The Jinja text of a --*_chat_template option: 'plain' (PLAIN_CHAT_TEMPLATE) or the path of a Jinja file."""
    if template == "plain":
        return PLAIN_CHAT_TEMPLATE
    try:
        with open(template, encoding="utf-8") as handle:
            return handle.read()
    except OSError as error:
        raise NeoError(f"cannot read the chat template file {template}: {error.strerror}") from None


def set_chat_template(tokenizer, template: str) -> None:
    """Install ``template``: 'plain' (PLAIN_CHAT_TEMPLATE) or the path of a Jinja file."""
    tokenizer.chat_template = chat_template_text(template)


def ensure_chat_template(tokenizer) -> bool:
    """Install the documented fallback template when the tokenizer has none. Returns True if it did."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return True


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant answers."""
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        end_text = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(start_text) and text.startswith(end_text)):
            raise NeoError(
                "the chat template does not render conversations incrementally (a prefix of the conversation "
                "renders differently from the start of the whole), so answers cannot be located; use a template "
                "without history rewriting"
            )
        spans.append((len(start_text), len(end_text)))
    return text, spans


def encode_messages(tokenizer, messages: list[dict[str, str]], max_length: int) -> tuple[list[int], list[int]]:
    text, spans = assistant_spans(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [
        token if any(start < span_end and end > span_start for span_start, span_end in spans) else IGNORE_INDEX
        for token, (start, end) in zip(input_ids, encoding["offset_mapping"], strict=True)
    ]
    return _truncate(input_ids, labels, max_length)


def encode_text(tokenizer, text: str, max_length: int) -> tuple[list[int], list[int]]:
    input_ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not input_ids or input_ids[-1] != tokenizer.eos_token_id):
        input_ids.append(tokenizer.eos_token_id)
    return _truncate(input_ids, list(input_ids), max_length)


def _truncate(input_ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    # Position 0 is never a prediction target (logits at t predict token t+1).
    if not count_answer_tokens(labels):
        raise DataError(f"no answer tokens left after truncation to max_length={max_length}")
    return input_ids, labels
