"""Text utilities: tokenizer loading, shared-vocabulary checks, per-token byte tables, offline Qwen tokenizer."""

from __future__ import annotations

from motab_jax.text.byte_level import byte_level_tokenizer
from motab_jax.text.qwen import QwenFamily, qwen_tokenizer
from motab_jax.text.token_table import VocabularyKind, special_token_mask, token_bytes_table, vocabulary_kind
from motab_jax.text.tokenizer import VocabularyMismatchError, check_shared_vocabulary, load_tokenizer

__all__ = [
    "QwenFamily",
    "VocabularyKind",
    "VocabularyMismatchError",
    "byte_level_tokenizer",
    "check_shared_vocabulary",
    "load_tokenizer",
    "qwen_tokenizer",
    "special_token_mask",
    "token_bytes_table",
    "vocabulary_kind",
]
