"""Exact incremental encoding: the ids of a growing (or rewound) text, equal to a full `encode` at every point, at
a cost per change that follows the changed text, not the whole context.

Why it is exact. A byte-level BPE with regex pre-tokenization (o200k, Qwen2/3, Llama 3, SmolLM2) never merges
across pre-tokens, so encode(text) is the concatenation of the encodings of its pre-tokens. Appending text can
only change the pre-tokenization near the end: the last pre-token may grow (``"12" + "3"``, ``"?" + "\\n\\n"``), and
a whitespace run before it may split differently (the ``\\s+(?!\\S)`` lookahead). The patterns have no lookbehind,
so pre-tokenizing from a pre-token start gives the same pieces as pre-tokenizing from the beginning. The encoder
therefore keeps every pre-token's start (in characters and in ids) and re-encodes from the start of the piece
`RESTART_PIECES` back. Added-token text (``<|im_start|>`` in a chat prompt) is split out first, as the tokenizer
does, and is one piece. Where the argument does not hold it re-encodes everything instead (and counts it): text
the normalizer changes near the seam (e.g. NFC composing a combining mark with the character before it) and
added-token text that starts before the restart point and ends after it.

Bytes from a decoder (a student step that ends inside a UTF-8 character) go through `append_bytes`, which holds
the incomplete tail back until its next bytes arrive; invalid bytes become U+FFFD as in `tokenizer.decode`.
"""

from __future__ import annotations

import codecs
import dataclasses
import re
import time
import weakref
from typing import Any

import numpy as np

from motab_jax.text.token_table import token_bytes_table

__all__ = ["EncoderStats", "IncrementalEncoder", "RESTART_PIECES"]

# Pre-tokens re-encoded before the changed point: the last piece may grow, the one before may split differently
# (whitespace lookahead), one more as margin.
RESTART_PIECES = 3


@dataclasses.dataclass
class EncoderStats:
    calls: int = 0  # appends and truncations
    chars_encoded: int = 0  # characters passed to the tokenizer (the cost)
    full_encodes: int = 0  # changes the incremental path could not prove exact, re-encoded from the start
    seconds: float = 0.0  # host time spent encoding


class _Backend:
    """What the encoder needs of one fast tokenizer, computed once and shared by its encoders."""

    def __init__(self, tokenizer: Any):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or backend.pre_tokenizer is None:
            raise TypeError(f"{type(tokenizer).__name__}: incremental encoding needs a fast (Rust) tokenizer with a "
                            "pre-tokenizer (a byte-level BPE such as Qwen, Llama 3, o200k or SmolLM2)")
        self.backend = backend
        self.normalizer = backend.normalizer
        self.pre_tokenizer = backend.pre_tokenizer
        self.token_lengths = np.asarray([len(b) for b in token_bytes_table(tokenizer)], np.int64)
        added = sorted((t.content for t in tokenizer.added_tokens_decoder.values()), key=len, reverse=True)
        self.added = re.compile("|".join(map(re.escape, added))) if added else None
        self.longest_added = max(map(len, added), default=0)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def pieces(self, text: str) -> list[int]:
        """Character offsets where the pre-tokens of `text` start; an added token's text (e.g. ``<|im_start|>`` in
        a chat prompt) is one piece, as the tokenizer splits those out before pre-tokenizing."""
        starts: list[int] = []
        done = 0
        matches = list(self.added.finditer(text)) if self.added is not None else []
        for segment_start, segment_end in [(m.start(), m.end()) for m in matches] + [(len(text), len(text))]:
            if segment_start > done:
                plain = text[done:segment_start]
                starts += [done + start for _, (start, _) in self.pre_tokenizer.pre_tokenize_str(plain)]
            if segment_end > segment_start:
                starts.append(segment_start)
            done = segment_end
        return starts

    def is_plain(self, text: str) -> bool:
        """The normalizer leaves `text` unchanged (else the seam can change characters before it)."""
        return self.normalizer is None or self.normalizer.normalize_str(text) == text

    def straddles(self, text: str, at: int) -> bool:
        """An added token's text in `text` starts before `at` and ends after it."""
        if self.added is None:
            return False
        lo = max(at - self.longest_added, 0)
        return any(m.start() < at < m.end() for m in self.added.finditer(text, lo, at + self.longest_added))


_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _backend_of(tokenizer: Any) -> _Backend:
    """One `_Backend` per tokenizer object (its token-length table costs a pass over the vocabulary)."""
    backend = _BACKENDS.get(tokenizer)
    if backend is None:
        backend = _BACKENDS[tokenizer] = _Backend(tokenizer)
    return backend


class IncrementalEncoder:
    """encode(text) of a text that grows by `append` / `append_bytes` and shrinks by `truncate`.

    `ids` always equals ``tokenizer.encode(text, add_special_tokens=False)``. `copy()` forks the state (e.g. the
    teacher's context at a safe state while exploration goes on)."""

    def __init__(self, tokenizer: Any, text: str = "", *, stats: EncoderStats | None = None,
                 _backend: _Backend | None = None):
        self._backend = _backend or _backend_of(tokenizer)
        self._tokenizer = tokenizer
        self.stats = stats if stats is not None else EncoderStats()
        self.text = ""
        self.ids: list[int] = []
        self._piece_chars: list[int] = []  # start of every pre-token, in characters
        self._piece_ids: list[int] = []  # index in `ids` of every pre-token's first id
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        if text:
            self.append(text)

    # ------------------------------------------------------------------ changes
    def append(self, text: str) -> None:
        if self._decoder.getstate()[0]:
            raise ValueError("append(str) while incomplete UTF-8 bytes are held back: use append_bytes")
        if text:
            self._reencode_from(self._restart(len(self._piece_chars)), self.text + text)

    def append_bytes(self, data: bytes) -> None:
        """Append decoded bytes; an incomplete UTF-8 character at the end waits for the next call."""
        self.append_text_of_bytes(self._decoder.decode(data, final=False))

    def append_text_of_bytes(self, text: str) -> None:
        if text:
            self._reencode_from(self._restart(len(self._piece_chars)), self.text + text)

    @property
    def held_back(self) -> bytes:
        """Bytes of an incomplete UTF-8 character waiting for the rest."""
        return self._decoder.getstate()[0]

    def truncate(self, num_chars: int) -> None:
        """Keep the first `num_chars` characters (dropping any held-back bytes)."""
        if not 0 <= num_chars <= len(self.text):
            raise ValueError(f"truncate({num_chars}): the text has {len(self.text)} characters")
        self._decoder.reset()
        # The piece that contains the cut, then RESTART_PIECES back from it.
        piece = int(np.searchsorted(self._piece_chars, num_chars, side="left"))
        self._reencode_from(self._restart(piece), self.text[:num_chars])

    def copy(self) -> IncrementalEncoder:
        out = IncrementalEncoder(self._tokenizer, stats=self.stats, _backend=self._backend)
        out.text, out.ids = self.text, list(self.ids)
        out._piece_chars, out._piece_ids = list(self._piece_chars), list(self._piece_ids)
        out._decoder.setstate(self._decoder.getstate())
        return out

    # ------------------------------------------------------------------ internals
    def _restart(self, piece: int) -> int:
        """The pre-token to re-encode from when pieces from `piece` on may change."""
        return max(piece - RESTART_PIECES, 0)

    def _reencode_from(self, piece: int, new_text: str) -> None:
        """Make the state encode `new_text`, which equals the current text up to pre-token `piece`'s start."""
        self.stats.calls += 1
        began = time.perf_counter()
        try:
            self._reencode(piece, new_text)
        finally:
            self.stats.seconds += time.perf_counter() - began

    def _reencode(self, piece: int, new_text: str) -> None:
        if not self._piece_chars:  # nothing encoded yet, or boundaries unknown (after a full re-encode)
            piece = start = first_id = 0
        else:
            start = self._piece_chars[piece] if piece < len(self._piece_chars) else len(self.text)
            first_id = self._piece_ids[piece] if piece < len(self._piece_ids) else len(self.ids)
        # The normalizer could change characters across the seam, and added-token text could start before it.
        window = new_text[max(start - 4, 0):]
        tail = new_text[start:]
        exact = self._backend.is_plain(window) and not self._backend.straddles(new_text, start)
        aligned = self._encode_pieces(tail) if exact else None
        if aligned is None:
            self.stats.full_encodes += 1
            start = first_id = piece = 0
            tail = new_text
            aligned = self._encode_pieces(tail, check=False)
            assert aligned is not None
        ids, piece_chars, piece_ids = aligned
        self.text = new_text
        del self.ids[first_id:], self._piece_chars[piece:], self._piece_ids[piece:]
        self.ids.extend(ids)
        self._piece_chars.extend(start + c for c in piece_chars)
        self._piece_ids.extend(first_id + i for i in piece_ids)

    def _encode_pieces(self, text: str, check: bool = True) -> tuple[list[int], list[int], list[int]] | None:
        """(ids, pre-token starts in characters, index of each pre-token's first id) of `text`; None when the ids
        do not fall on the pre-token boundaries (then the incremental argument does not apply)."""
        self.stats.chars_encoded += len(text)
        ids = self._backend.encode(text)
        starts = self._backend.pieces(text)
        if not check and not self._backend.is_plain(text):
            return ids, [], []  # no boundaries known: the next change re-encodes from the start
        id_ends = np.cumsum(self._backend.token_lengths[ids]) if ids else np.zeros(0, np.int64)
        piece_bytes = np.cumsum([0] + [len(text[a:b].encode("utf-8")) for a, b in zip(starts, starts[1:])])
        first = np.searchsorted(id_ends, piece_bytes, side="right")  # ids ending at or before a piece's start
        # Every piece must start exactly where an id starts.
        id_starts = np.concatenate([[0], id_ends])
        if len(ids) and (np.any(first > len(ids)) or np.any(id_starts[np.minimum(first, len(ids))] != piece_bytes)):
            if check:
                return None
            return ids, [], []
        return ids, starts, first.tolist()
