"""How a finished trajectory's pieces become a record's segments (spec 3.8-3.10), for both engines' records.

A record is a sequence of pieces, each of one provenance: student ids, the revise text, the teacher's ids (shared
vocabulary) or the teacher's text with its student-vocabulary encoding (across vocabularies). Three rules:

1. **Seam** (spec 3.8). A stitched record is steps 1..t as generated, then REVISE + "\\n\\n", then the teacher's
   text; "\\n\\n" goes before REVISE only when the student's text does not already end with it. A step ended by the
   delimiter ".\\n\\n" does ("...step.\\n\\nHowever,\\n\\n<teacher>"); one ended by an end-of-sequence token or the step
   cap does not ("...step\\n\\nHowever,\\n\\n<teacher>"). With no student text at all (step 1 was only an
   end-of-sequence token) there is nothing to separate from and REVISE opens the response. Records without
   stitching (SKD, teacher-only, MOTAB's no-stitching ablation) are the pieces as generated, back to back: the
   teacher continued from exactly that context, so nothing is inserted at their seams.
2. **Special tokens.** No special token of the student's tokenizer (`text.special_token_mask`) is in a segment's
   ids except the record's very last id (the end-of-sequence that ended the trajectory). A breaching step that
   ended with the student's end-of-sequence keeps its text, not that id: SFT trains on segment ids, and an EOS
   in the middle of a response with loss mask 1 teaches the student to stop before "However,". Step offsets
   (`steps[].start`, `safe_prefix_tokens`) count the ids that are in the record (revise left out), and
   `dropped_special_ids` lists what was left out ({offset: record ids before it, source, id}), so the generated
   stream stays recoverable.
3. **One byte stream** (spec 3.10). The response is the UTF-8 decode of all pieces' bytes as one stream (special
   tokens contribute no bytes, as a detokenizer skipping them): a character whose bytes straddle a seam (a student
   token ending mid-character, the teacher's next token completing it) is that character, not two replacement
   characters. It belongs to the segment that completes it, so segment texts still concatenate to the response.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Sequence

import numpy as np

from motab_jax.text import special_token_mask, token_bytes_table

PARAGRAPH = "\n\n"  # what separates REVISE from the student's steps and from the teacher's text


def revise_text(revise: str, student_bytes: bytes) -> str:
    """The text the revise segment contributes after the student's steps 1..t, whose bytes are `student_bytes`."""
    before = PARAGRAPH if student_bytes and not student_bytes.endswith(PARAGRAPH.encode()) else ""
    return f"{before}{revise}{PARAGRAPH}"


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """What records need of a student tokenizer: the text bytes of each id and which ids are special."""

    text_bytes: list[bytes]  # per id; special tokens and ids past the tokenizer's vocabulary: b""
    special: np.ndarray  # [len(text_bytes)] bool

    def bytes_of(self, ids: Sequence[int]) -> bytes:
        n = len(self.text_bytes)
        return b"".join(self.text_bytes[i] if 0 <= i < n else b"" for i in ids)

    def keep(self, ids: Sequence[int]) -> np.ndarray:
        """[len(ids)] bool: the ids a record keeps, every one but the special ones before the last position."""
        ids = np.asarray(ids, np.int64)
        inside = (ids >= 0) & (ids < len(self.special))
        special = np.zeros(len(ids), bool)
        special[inside] = self.special[ids[inside]]
        if len(ids):
            special[-1] = False
        return ~special


_VOCABULARIES: weakref.WeakKeyDictionary[Any, Vocabulary] = weakref.WeakKeyDictionary()


def vocabulary(tokenizer: Any) -> Vocabulary:
    """`tokenizer`'s `Vocabulary`, built once per tokenizer object (a 150k vocabulary takes about half a second)."""
    try:
        cached = _VOCABULARIES.get(tokenizer)
    except TypeError:  # not weakly referenceable: built each time
        cached = None
    if cached is None:
        special = special_token_mask(tokenizer)
        cached = Vocabulary([b"" if s else t for t, s in zip(token_bytes_table(tokenizer), special)], special)
        try:
            _VOCABULARIES[tokenizer] = cached
        except TypeError:
            pass
    return cached


@dataclasses.dataclass
class Piece:
    """One segment before its text is known: `data` is its bytes in the record's text stream."""

    source: str  # "student" / "revise" / "teacher"
    token_ids: list[int]  # in the student's vocabulary
    data: bytes
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # fields copied into the segment as they are


def revise_piece(revise: str, before: Sequence[Piece], student_tokenizer: Any) -> Piece:
    """The revise segment after `before` (the student's steps 1..t): its ids are the student tokenizer's encoding of
    exactly the text it contributes."""
    text = revise_text(revise, b"".join(p.data for p in before))
    ids = list(student_tokenizer(text, add_special_tokens=False)["input_ids"])
    return Piece("revise", ids, text.encode())


def _char_start(stream: bytes, cut: int) -> int:
    """`cut` moved back to the first byte of the UTF-8 character it would split (a lead byte before `cut` whose
    sequence runs past it); unchanged where `cut` splits no character."""
    if cut >= len(stream) or not 0x80 <= stream[cut] < 0xC0:
        return cut
    for start in range(cut - 1, max(cut - 4, -1), -1):
        byte = stream[start]
        if 0x80 <= byte < 0xC0:
            continue  # a continuation byte: the lead is further back
        length = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4 if byte < 0xF8 else 1
        return start if start + length > cut else cut
    return cut


def split_stream(parts: Sequence[bytes]) -> list[str]:
    """The texts of `parts` decoded as one UTF-8 stream (invalid bytes: U+FFFD): a character split over parts goes
    to the part that completes it. `"".join(result) == b"".join(parts).decode("utf-8", "replace")`: every cut falls
    before a byte that is not a continuation of the character before it, where the decoder starts afresh anyway."""
    stream = b"".join(parts)
    cuts, position = [0], 0
    for part in parts[:-1]:
        position += len(part)
        cuts.append(max(cuts[-1], _char_start(stream, position)))
    cuts.append(len(stream))
    return [stream[a:b].decode("utf-8", "replace") for a, b in zip(cuts, cuts[1:])]


def build_segments(pieces: Sequence[Piece]) -> list[dict[str, Any]]:
    """The record's segments: source, num_tokens, token_ids, text (and each piece's extra fields)."""
    texts = split_stream([p.data for p in pieces])
    return [{"source": p.source, "num_tokens": len(p.token_ids), "token_ids": list(p.token_ids), **p.extra,
             "text": text} for p, text in zip(pieces, texts)]
