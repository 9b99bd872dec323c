"""Greedy sequence packing: several tokenized examples per fixed-length row, kept apart by segment ids.

Each row of length L holds whole examples ("documents"), never a part of one: `segment_ids` are 1, 2, ...
per document in the row and 0 on padding, `positions` restart at 0 for each document (so rotary
positions match an unpacked forward), and the attention must keep to one segment. `targets[i]` is the
next token when it belongs to the same document and 0 otherwise (a document's last token, padding), so
no loss crosses a boundary; `loss_mask[i]` (float32) is the mask of that target token, 0 where there is
none.

Packing is best-fit decreasing (longest examples first, each into the open row it fills the most;
ties to the oldest row): deterministic and usually within a few percent of optimal fill. Row order
does not matter because the batch iterator shuffles rows.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from motab_jax.data.formatting import TokenizedExample
from motab_jax.errors import MotabInputError

__all__ = ["PackStats", "PackedRow", "pack_examples"]


@dataclass(frozen=True)
class PackedRow:
    tokens: np.ndarray  # [L] int32 model inputs (pad_id on padding)
    targets: np.ndarray  # [L] int32 next token within the segment, 0 where none
    loss_mask: np.ndarray  # [L] float32 mask of the target token, 0 where no target
    segment_ids: np.ndarray  # [L] int32 1..k per document, 0 on padding
    positions: np.ndarray  # [L] int32 position within the document, 0 on padding


@dataclass
class PackStats:
    num_examples: int = 0  # examples given
    num_packed: int = 0  # examples placed in rows
    num_rows: int = 0
    truncated: int = 0  # examples longer than seq_len, cut to seq_len
    dropped_no_target: int = 0  # examples with no trained target token left (e.g. prompt-only after a cut)
    num_tokens: int = 0  # real (non-padding) tokens in the rows
    num_loss_tokens: int = 0  # positions with loss_mask 1
    seq_len: int = 0

    @property
    def fill(self) -> float:
        """Fraction of row positions holding real tokens."""
        return self.num_tokens / max(1, self.num_rows * self.seq_len)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "fill": self.fill}


def _assign_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: the example indices of each row, in placement order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    # Open rows grouped by free space: a sorted list of the distinct free amounts (<= seq_len entries,
    # so bisect + insert stay cheap however many rows there are) and, per amount, a min-heap of its rows.
    free_sizes: list[int] = []
    rows_by_free: dict[int, list[int]] = {}
    for i in order:
        need = lengths[i]
        k = bisect.bisect_left(free_sizes, need)
        if k == len(free_sizes):
            row, free = len(rows), seq_len
            rows.append([])
        else:
            free = free_sizes[k]
            row = heapq.heappop(rows_by_free[free])
            if not rows_by_free[free]:
                del rows_by_free[free]
                free_sizes.pop(k)
        rows[row].append(i)
        left = free - need
        if left > 0:
            if left not in rows_by_free:
                rows_by_free[left] = []
                bisect.insort(free_sizes, left)
            heapq.heappush(rows_by_free[left], row)
    return rows


def _build_row(docs: Sequence[TokenizedExample], seq_len: int, pad_id: int) -> PackedRow:
    tokens = np.full(seq_len, pad_id, np.int32)
    mask = np.zeros(seq_len, np.float32)  # mask of each token itself (shifted onto targets below)
    segment_ids = np.zeros(seq_len, np.int32)
    positions = np.zeros(seq_len, np.int32)
    start = 0
    for k, doc in enumerate(docs, 1):
        n = len(doc)
        tokens[start:start + n] = doc.input_ids
        mask[start:start + n] = doc.loss_mask
        segment_ids[start:start + n] = k
        positions[start:start + n] = np.arange(n, dtype=np.int32)
        start += n
    # A target exists where the next position is in the same (real) document.
    same = np.zeros(seq_len, bool)
    same[:-1] = (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[:-1] > 0)
    targets = np.where(same, np.roll(tokens, -1), 0).astype(np.int32)
    loss_mask = np.where(same, np.roll(mask, -1), 0.0).astype(np.float32)
    return PackedRow(tokens=tokens, targets=targets, loss_mask=loss_mask, segment_ids=segment_ids,
                     positions=positions)


def pack_examples(examples: Sequence[TokenizedExample], seq_len: int, *,
                  pad_id: int = 0) -> tuple[list[PackedRow], PackStats]:
    """Pack `examples` into rows of `seq_len` tokens.

    Examples longer than `seq_len` are truncated to it (counted); examples left without any trained
    target (a single token, or only prompt after the cut) are dropped (counted): they would add no loss.
    """
    if seq_len < 2:
        raise MotabInputError(f"seq_len={seq_len}: a row needs at least 2 tokens to hold one target")
    stats = PackStats(num_examples=len(examples), seq_len=seq_len)
    kept: list[TokenizedExample] = []
    for ex in examples:
        if len(ex) > seq_len:
            stats.truncated += 1
            ex = TokenizedExample(id=ex.id, input_ids=ex.input_ids[:seq_len], loss_mask=ex.loss_mask[:seq_len],
                                  num_prompt_tokens=min(ex.num_prompt_tokens, seq_len))
        # Token 0 is never a target, so only the masks of tokens 1.. count.
        if not np.any(ex.loss_mask[1:]):
            stats.dropped_no_target += 1
            continue
        kept.append(ex)
    rows = [_build_row([kept[i] for i in row], seq_len, pad_id)
            for row in _assign_rows([len(ex) for ex in kept], seq_len)]
    stats.num_packed = len(kept)
    stats.num_rows = len(rows)
    stats.num_tokens = sum(len(ex) for ex in kept)
    stats.num_loss_tokens = int(sum(float(r.loss_mask.sum()) for r in rows))
    return rows, stats
