"""What each token id of a tokenizer stands for as UTF-8 bytes, and the map between two tokenizers' vocabularies.

Tokenizers spell text differently: byte-level BPE writes bytes as printable characters (``Ġ`` for a space),
SentencePiece-style vocabularies write a space as ``▁`` and unknown bytes as ``<0xNN>``. ``token_bytes`` undoes
those conventions, so that two vocabularies can be compared on the text their tokens stand for, and so that
evaluation can count an answer's bytes (bits per byte). Special tokens (chat markers, EOS) stand for no text.

``VocabularyMap`` pairs the ids whose bytes are identical in both vocabularies; the KD term across tokenizers
compares the two next-token distributions on those pairs (losses/cross_vocab.py). Identical tokenizers give the
identity over the shared output range, exactly what the one-tokenizer path compares.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import torch

from ..errors import ConfigError
from ..losses.vocab_map import VocabularyMap

BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable character for each byte, inverted: the alphabet of byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[chr(byte)] = byte
        else:
            characters[chr(256 + extra)] = byte
            extra += 1
    return characters


def _decoder_types(tokenizer) -> set[str]:
    """The type names of a fast tokenizer's decoder and of the decoders it chains."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} is not a fast tokenizer: "
                          "distilling across tokenizers needs the character offsets only fast tokenizers give")
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    stack, types = [decoder], set()
    while stack:
        node = stack.pop()
        types.add(node.get("type"))
        stack.extend(node.get("decoders") or [])
    return types


def token_bytes(tokenizer) -> list[bytes | None]:
    """The UTF-8 bytes every id of ``tokenizer`` stands for; None for special tokens (they are no text)."""
    byte_level = "ByteLevel" in _decoder_types(tokenizer)
    alphabet = _byte_level_decoder()
    special = set(tokenizer.all_special_ids) | {
        index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    result: list[bytes | None] = []
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if index in special or token is None:
            result.append(None)
        elif byte_level and all(character in alphabet for character in token):
            result.append(bytes(alphabet[character] for character in token))
        elif match := BYTE_FALLBACK.fullmatch(token):
            result.append(bytes([int(match.group(1), 16)]))
        else:
            result.append(token.replace("▁", " ").encode("utf-8"))
    return result


def byte_lengths(tokenizer, size: int | None = None) -> torch.Tensor | None:
    """(size,) int64: the UTF-8 bytes each id stands for (0 for special tokens and ids past the tokenizer); None for
    a tokenizer without a fast backend, whose conventions cannot be read."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return None
    lengths = [len(value) if value is not None else 0 for value in token_bytes(tokenizer)]
    size = max(size or 0, len(lengths))
    return torch.tensor(lengths + [0] * (size - len(lengths)), dtype=torch.long)


def same_vocabulary(first, second) -> bool:
    """Whether two tokenizers map every id to the same token (one tokenizer, as far as KD is concerned)."""
    return first.convert_ids_to_tokens(list(range(len(first)))) == second.convert_ids_to_tokens(
        list(range(len(second))))


def build_vocabulary_map(teacher_tokenizer, student_tokenizer, teacher_outputs: int,
                         student_outputs: int) -> VocabularyMap:
    """Pair the ids whose bytes are identical. ``*_outputs``: the sizes of the models' output layers."""
    if same_vocabulary(teacher_tokenizer, student_tokenizer):
        shared = min(teacher_outputs, student_outputs)
        ids = torch.arange(shared)
        return VocabularyMap(ids, ids.clone(), shared, shared, identical=True)
    teacher_index: dict[bytes, int] = {}
    for index, value in enumerate(token_bytes(teacher_tokenizer)[:teacher_outputs]):
        if value is not None:
            teacher_index.setdefault(value, index)
    pairs = []
    for index, value in enumerate(token_bytes(student_tokenizer)[:student_outputs]):
        if value is not None and value in teacher_index:
            pairs.append((teacher_index.pop(value), index))  # pop: one to one, the first student id keeps it
    teacher_ids, student_ids = (torch.tensor(side, dtype=torch.long) for side in zip(*pairs, strict=False)) if pairs else (
        torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    return VocabularyMap(teacher_ids, student_ids, min(len(teacher_tokenizer), teacher_outputs),
                         min(len(student_tokenizer), student_outputs))
