"""Exact step-delimiter detection on the token stream with a byte automaton.

The delimiter (default ".\n\n") may be one token, be split over several tokens, or be completed in
the middle of a token ("...5.\n\nThe" in one id). A Knuth-Morris-Pratt automaton over the delimiter's
bytes is run over every vocabulary id's bytes from every automaton state once, on the host, giving two
tables indexed by (state, token id): the state after the token, and whether the delimiter was completed
inside it. On the device, detecting a step end is then two gathers per token.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def _kmp_transitions(pattern: bytes) -> np.ndarray:
    """delta[state, byte] for states 0..len(pattern)-1 (state = length of the matched prefix)."""
    m = len(pattern)
    fail = [0] * m
    k = 0
    for i in range(1, m):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    delta = np.zeros((m + 1, 256), np.int32)
    for state in range(m + 1):
        for byte in range(256):
            k = state if state < m else fail[m - 1]
            while k and pattern[k] != byte:
                k = fail[k - 1]
            delta[state, byte] = k + 1 if pattern[k] == byte else 0
    return delta


@dataclasses.dataclass(frozen=True)
class DelimiterTables:
    next_state: np.ndarray  # [num_states, vocab] int32: automaton state after the token
    completes: np.ndarray  # [num_states, vocab] bool: the delimiter ends inside (or at the end of) the token


def build_delimiter_tables(token_bytes: Sequence[bytes], delimiter: str) -> DelimiterTables:
    """Tables for `delimiter` over a vocabulary given as per-id bytes (see `motab_jax.text.token_bytes_table`).

    After a completion the automaton restarts at state 0 for the next step (bytes of the same token after
    the delimiter belong to the step that just ended, since a token cannot be split).
    """
    pattern = delimiter.encode("utf-8")
    if not pattern:
        raise ValueError("the step delimiter must not be empty")
    m = len(pattern)
    delta = _kmp_transitions(pattern)
    vocab = len(token_bytes)
    next_state = np.zeros((m, vocab), np.int32)
    completes = np.zeros((m, vocab), bool)
    for token_id, data in enumerate(token_bytes):
        for start in range(m):
            state, done = start, False
            for byte in data:
                state = int(delta[state, byte])
                if state == m:
                    done = True
                    break
            next_state[start, token_id] = 0 if done else state
            completes[start, token_id] = done
    return DelimiterTables(next_state, completes)
