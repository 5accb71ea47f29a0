"""Tiny models and tokenizers built locally from shipped text: the offline demo and the tests use them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from collections.abc import Iterable
from importlib import resources

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def corpus_rows() -> list[dict]:
    """The shipped demo conversations (ShareGPT format)."""
    text = resources.files("llmneo.demo").joinpath("corpus.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def corpus_texts() -> list[str]:
    return [turn["value"] for row in corpus_rows() for turn in row["conversations"]]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 400, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with ChatML markers and (optionally) a ChatML template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(list(texts) + ["<|im_start|>user\n<|im_end|>"], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", additional_special_tokens=SPECIAL_TOKENS[3:])
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_char_tokenizer(texts: Iterable[str], chat_template: bool = False) -> PreTrainedTokenizerFast:
    """A character-level tokenizer in SentencePiece conventions: a space is ``▁``, characters it has not seen are
    UTF-8 bytes ``<0xNN>``; EOS ``</s>``, no chat template unless asked (so llm-neo's fallback template applies)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"<0x{byte:02X}>": len(vocab) + byte for byte in range(256)})
    for character in sorted({character for text in texts for character in text}):
        vocab.setdefault("▁" if character == " " else character, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", additional_special_tokens=SPECIAL_TOKENS[3:])
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class TinyShape:
    """The shape of a tiny Llama; ``vocab_size`` larger than the tokenizer pads the embedding like real models."""

    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int | None = None  # None: the tokenizer's
    tie_word_embeddings: bool = False


def build_tiny_llama(tokenizer, seed: int = 0, **shape) -> LlamaForCausalLM:
    """A random-initialised Llama of the ``TinyShape`` the keyword arguments give."""
    dims = TinyShape(**shape)
    config = LlamaConfig(
        vocab_size=dims.vocab_size or len(tokenizer),
        hidden_size=dims.hidden_size,
        intermediate_size=dims.hidden_size * 2,
        num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.num_heads,
        num_key_value_heads=dims.num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=dims.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


