"""Loading tokenizers from local folders and checking that teacher and student share one vocabulary."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from motab_jax.errors import MotabInputError

__all__ = ["TOKENIZER_FILES", "VocabularyMismatchError", "check_shared_vocabulary", "load_tokenizer"]

# Any one of these (a pair counts as one) is enough for AutoTokenizer to build a tokenizer.
TOKENIZER_FILES: tuple[tuple[str, ...], ...] = (
    ("tokenizer.json",),
    ("tokenizer_config.json",),
    ("vocab.json", "merges.txt"),
    ("tokenizer.model",),
)

_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")

_CONSEQUENCE = (
    "The shared-vocabulary path compares teacher and student distributions id by id, so it needs "
    "identical tokenizers (same id -> token mapping and the same special tokens); use a student "
    "from the teacher's tokenizer family or a cross-vocabulary method."
)


def load_tokenizer(path: str | os.PathLike[str], **kwargs: Any) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored in the local folder ``path`` with ``AutoTokenizer.from_pretrained``.

    Extra keyword arguments are forwarded to ``from_pretrained``. Raises ``FileNotFoundError``
    naming the folder and the files looked for when the folder holds no tokenizer files, instead
    of letting transformers mistake the path for a hub repository id.
    """
    folder = Path(path)
    looked_for = " / ".join(" + ".join(group) for group in TOKENIZER_FILES)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist (expected one of: {looked_for})")
    if not any(all((folder / name).is_file() for name in group) for group in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer files in {str(folder)!r}: looked for {looked_for}")
    return AutoTokenizer.from_pretrained(str(folder), **kwargs)


class VocabularyMismatchError(MotabInputError):
    """Raised when two tokenizers that must share a vocabulary do not."""


def _id_to_token(tokenizer: PreTrainedTokenizerBase) -> list[str | None]:
    """Every id's token string, added tokens included (None for ids the vocabulary skips)."""
    return list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))


def _first_difference(a: Sequence[object], b: Sequence[object]) -> int:
    """Index of the first differing element of two equally long sequences (-1 if equal)."""
    if a == b:  # one C-level pass in the common case
        return -1
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return -1


def _describe_token(tokenizer: PreTrainedTokenizerBase, attr: str) -> str:
    token = getattr(tokenizer, attr, None)
    if token is None:
        return "unset"
    return f"{str(token)!r} (id {tokenizer.convert_tokens_to_ids(str(token))})"


def check_shared_vocabulary(
    a: PreTrainedTokenizerBase,
    b: PreTrainedTokenizerBase,
    *,
    names: tuple[str, str] = ("teacher", "student"),
) -> None:
    """Check that ``a`` and ``b`` have the same vocabulary and the same special tokens.

    Compares, in this order: the token of every id both tokenizers have, the vocabulary sizes,
    the named special tokens (bos/eos/unk/pad/sep/cls/mask, token and id), the added tokens (id,
    content and special flag) and the full set of special ids. Raises ``VocabularyMismatchError``
    describing the first difference found; returns None when the tokenizers agree.
    """
    na, nb = names

    def fail(what: str) -> None:
        raise VocabularyMismatchError(f"{na} and {nb} tokenizers differ: {what}. {_CONSEQUENCE}")

    tokens_a, tokens_b = _id_to_token(a), _id_to_token(b)
    common = min(len(tokens_a), len(tokens_b))
    i = _first_difference(tokens_a[:common], tokens_b[:common])
    if i >= 0:
        fail(f"{na} id {i} is {tokens_a[i]!r} but {nb} id {i} is {tokens_b[i]!r}")
    if len(tokens_a) != len(tokens_b):
        longer, tokens = (na, tokens_a) if len(tokens_a) > len(tokens_b) else (nb, tokens_b)
        fail(
            f"vocabulary sizes differ: {na} {len(tokens_a)}, {nb} {len(tokens_b)} "
            f"(first id only in {longer}: {common} {tokens[common]!r})"
        )

    for attr in _NAMED_SPECIAL:
        desc_a, desc_b = _describe_token(a, attr), _describe_token(b, attr)
        if desc_a != desc_b:
            fail(f"{attr} differs: {na} {desc_a}, {nb} {desc_b}")

    added_a = {i: (t.content, bool(t.special)) for i, t in a.added_tokens_decoder.items()}
    added_b = {i: (t.content, bool(t.special)) for i, t in b.added_tokens_decoder.items()}
    if added_a != added_b:
        for i in sorted(set(added_a) | set(added_b)):
            if added_a.get(i) != added_b.get(i):
                desc_a, desc_b = _describe_added(added_a.get(i)), _describe_added(added_b.get(i))
                fail(f"added token id {i}: {na} {desc_a}, {nb} {desc_b}")

    special_a = {i for i in a.all_special_ids if i is not None}
    special_b = {i for i in b.all_special_ids if i is not None}
    if special_a != special_b:
        i = min(special_a ^ special_b)
        owner, other = (na, nb) if i in special_a else (nb, na)
        token = tokens_a[i] if 0 <= i < len(tokens_a) else None
        fail(f"id {i} ({token!r}) is a special token of {owner} but not of {other}")


def _describe_added(entry: tuple[str, bool] | None) -> str:
    if entry is None:
        return "has no added token"
    content, special = entry
    return f"{content!r} (special={special})"
