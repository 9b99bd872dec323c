"""Per-id byte tables: the exact bytes each token id contributes to a decoded token stream.

Decoding a token sequence concatenates per-token bytes before the UTF-8 decode, so a byte table
lets later code scan a token stream for a delimiter (e.g. ``b".\\n\\n"``) with a byte automaton,
even when the delimiter straddles tokens or a token holds only part of a UTF-8 character.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from motab_jax.text.qwen import bytes_to_unicode

__all__ = ["VocabularyKind", "special_token_mask", "token_bytes_table", "vocabulary_kind"]

VocabularyKind = Literal["byte_level", "sentencepiece"]

_SP_SPACE = "\u2581"  # SentencePiece's "▁", which stands for a space
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_nodes(tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """The JSON nodes of the fast tokenizer's decoder, flattened (empty for slow tokenizers)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return []
    nodes, stack = [], [json.loads(decoder.__getstate__())]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.get("decoders") or [])
    return nodes


def vocabulary_kind(tokenizer: PreTrainedTokenizerBase) -> VocabularyKind:
    """How the tokenizer spells bytes in its vocabulary: GPT-2 byte-level or SentencePiece-style.

    Decided from the fast tokenizer's decoder when there is one, else from the vocabulary itself.
    Raises ``ValueError`` for other schemes (e.g. WordPiece), whose decoding is not a plain
    concatenation of per-token bytes.
    """
    nodes = _decoder_nodes(tokenizer)
    types = {node.get("type") for node in nodes}
    if "ByteLevel" in types:
        return "byte_level"
    sp_replace = any(
        node.get("type") == "Replace" and (node.get("pattern") or {}).get("String") == _SP_SPACE for node in nodes
    )
    if types & {"ByteFallback", "Metaspace"} or sp_replace:
        return "sentencepiece"
    if not nodes:
        vocab = tokenizer.get_vocab()
        if any(_SP_SPACE in token or _BYTE_FALLBACK.fullmatch(token) for token in vocab):
            return "sentencepiece"
        if all(char in vocab for char in bytes_to_unicode().values()):
            return "byte_level"
    raise ValueError(
        f"cannot build a byte table for {type(tokenizer).__name__} (decoder types {sorted(map(str, types))}): "
        "only byte-level BPE and SentencePiece-style vocabularies are supported"
    )


def _byte_level_bytes(tokens: list[str | None]) -> list[bytes]:
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    # Map each alphabet character to the latin-1 character of its byte, so translate + encode
    # ("latin-1") turns a whole token into bytes in C.
    table = {ord(char): chr(byte) for char, byte in byte_of.items()}
    outside_alphabet = re.compile("[^" + re.escape("".join(byte_of)) + "]")
    out: list[bytes] = []
    for token in tokens:
        if token is None:
            out.append(b"")
        elif outside_alphabet.search(token) is None:
            out.append(token.translate(table).encode("latin-1"))
        else:
            # Like the tokenizers ByteLevel decoder, characters outside the alphabet decode as UTF-8.
            out.append(b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode("utf-8") for c in token))
    return out


def _sentencepiece_bytes(tokens: list[str | None]) -> list[bytes]:
    out: list[bytes] = []
    for token in tokens:
        if token is None:
            out.append(b"")
            continue
        match = _BYTE_FALLBACK.fullmatch(token) if token.startswith("<0x") else None
        out.append(bytes([int(match.group(1), 16)]) if match else token.replace(_SP_SPACE, " ").encode("utf-8"))
    return out


def token_bytes_table(tokenizer: PreTrainedTokenizerBase) -> list[bytes]:
    """The bytes each id contributes when a token sequence is decoded, for every id (``len(tokenizer)``).

    Byte-level BPE tokens (Qwen, Llama 3, SmolLM2, GPT-2) are mapped back through the GPT-2
    byte-to-unicode alphabet. SentencePiece-style tokens map ``▁`` to a space and ``<0xNN>``
    byte-fallback tokens to that byte; the dummy-prefix space some SentencePiece tokenizers strip
    from the first token of a decode is kept, as it is in the middle of a stream. Added tokens
    (special or not) map to the UTF-8 of their content, i.e. decoding without skipping specials.
    Ids the vocabulary skips map to ``b""``. Builds a 150k vocabulary in well under a second.
    """
    n = len(tokenizer)
    kind = vocabulary_kind(tokenizer)
    tokens = list(tokenizer.convert_ids_to_tokens(list(range(n))))
    table = _byte_level_bytes(tokens) if kind == "byte_level" else _sentencepiece_bytes(tokens)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if 0 <= token_id < n:
            table[token_id] = added.content.encode("utf-8")
    return table


def special_token_mask(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Boolean ``[len(tokenizer)]`` mask, True for special/control tokens.

    A token is special when it is an added token flagged ``special`` or one of the tokenizer's
    special tokens (bos/eos/pad/unk/... and extra special tokens). Added tokens flagged
    non-special, such as Qwen3's ``<think>``, are ordinary text and stay False.
    """
    n = len(tokenizer)
    mask = np.zeros(n, dtype=bool)
    ids = [i for i, added in tokenizer.added_tokens_decoder.items() if added.special]
    ids += [i for i in tokenizer.all_special_ids if i is not None]
    ids = [i for i in ids if 0 <= i < n]
    mask[np.asarray(ids, dtype=np.int64)] = True
    return mask
