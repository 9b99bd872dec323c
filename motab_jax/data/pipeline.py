"""A deterministic, checkpointable batch iterator over packed SFT rows, and the examples -> rows helper.

Order: epoch e visits the rows in `np.random.default_rng([seed, e]).permutation(num_rows)` (identity
without shuffling) and cuts it into `steps_per_epoch = num_rows // global_batch_size` global batches;
the last partial batch of each epoch is dropped (those rows come back, in another order, in the next
epoch's permutation) so every step has the same static shape and no padding rows. The batch at
(epoch, step) depends only on (seed, epoch, step), which makes the position (`state()`) a two-integer
checkpoint and restoring it exact. Each process takes its contiguous slice of the global batch:
rows [process_index * B, (process_index + 1) * B) with B = global_batch_size // process_count, so
the slices of all processes, concatenated in process order, are the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from motab_jax.data.formatting import FormatStats, format_examples
from motab_jax.data.packing import PackedRow, PackStats, pack_examples
from motab_jax.data.sources import Example
from motab_jax.errors import MotabInputError

__all__ = ["BATCH_KEYS", "BatchIterator", "SFTBuildStats", "SFTDataset", "build_sft_rows"]

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


class SFTDataset:
    """Packed rows stacked into arrays of shape [num_rows, L] (one per `BATCH_KEYS` entry)."""

    def __init__(self, rows: Sequence[PackedRow]):
        if not rows:
            raise MotabInputError("SFTDataset needs at least one packed row")
        lengths = {r.tokens.shape[0] for r in rows}
        if len(lengths) != 1:
            raise MotabInputError(f"packed rows have different lengths {sorted(lengths)}; pack with one seq_len")
        self.arrays: dict[str, np.ndarray] = {k: np.stack([getattr(r, k) for r in rows]) for k in BATCH_KEYS}

    def __len__(self) -> int:
        return int(self.arrays["tokens"].shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.arrays["tokens"].shape[1])

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `indices [n]` of every array: {key: [n, L]}."""
        return {k: v[indices] for k, v in self.arrays.items()}


class BatchIterator:
    """Batches {key: [global_batch_size // process_count, L]} of `dataset`, epoch after epoch.

    `num_epochs=None` repeats forever. Raises StopIteration after `total_steps` batches.
    """

    def __init__(self, dataset: SFTDataset, global_batch_size: int, *, seed: int, num_epochs: int | None = 1,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1):
        if global_batch_size < 1 or global_batch_size % process_count:
            raise MotabInputError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                             f"process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise MotabInputError(f"process_index={process_index} not in [0, {process_count})")
        if seed < 0:
            raise MotabInputError(f"seed={seed} must be >= 0 (it seeds numpy's Generator)")
        if len(dataset) < global_batch_size:
            raise MotabInputError(f"{len(dataset)} packed rows < global_batch_size={global_batch_size}: not one "
                             "full batch; lower the batch size or add data")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.num_epochs = num_epochs
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self.local_batch_size = global_batch_size // process_count
        self.steps_per_epoch = len(dataset) // global_batch_size
        self.epoch = 0
        self.step = 0  # within the epoch
        self._order_epoch = -1
        self._order = np.arange(0)

    @property
    def total_steps(self) -> int | None:
        return None if self.num_epochs is None else self.steps_per_epoch * self.num_epochs

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Row indices [num_rows] in the order epoch `epoch` visits them (its tail beyond full batches unused)."""
        if epoch != self._order_epoch:
            n = len(self.dataset)
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        start = self.step * self.global_batch_size + self.process_index * self.local_batch_size
        batch = self.dataset.take(self.epoch_order(self.epoch)[start:start + self.local_batch_size])
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def state(self) -> dict[str, Any]:
        """Where the iterator stands (JSON-serializable) plus what the order depends on, checked on restore.

        Process index and count are not part of it: the global batch sequence does not depend on them,
        so a checkpoint can resume on a different number of processes.
        """
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "shuffle": self.shuffle,
                "global_batch_size": self.global_batch_size, "num_rows": len(self.dataset)}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from `state()`: the next batches are the ones the saved iterator would have produced."""
        mine = self.state()
        for key in ("seed", "shuffle", "global_batch_size", "num_rows"):
            if key in state and state[key] != mine[key]:
                raise MotabInputError(f"iterator state has {key}={state[key]!r} but this iterator has {mine[key]!r}; "
                                 "the restored batch order would differ")
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise MotabInputError(f"iterator state epoch={epoch}, step={step} out of range "
                             f"(steps_per_epoch={self.steps_per_epoch})")
        self.epoch, self.step = epoch, step


@dataclass
class SFTBuildStats:
    format: FormatStats
    pack: PackStats

    def as_dict(self) -> dict[str, float]:
        """Flat {"format/<name>": ..., "pack/<name>": ...} for logging."""
        return {**{f"format/{k}": v for k, v in self.format.as_dict().items()},
                **{f"pack/{k}": v for k, v in self.pack.as_dict().items()}}


def build_sft_rows(examples: Sequence[Example], tokenizer: Any, seq_len: int, *,
                   mask_flawed_student_segment: bool = False, cutoff_len: int | None = None,
                   apply_chat_template: bool = True, chat_template_kwargs: Mapping[str, Any] | None = None
                   ) -> tuple[list[PackedRow], SFTBuildStats]:
    """Format `examples` with `tokenizer` (see `format_examples`) and pack them into rows of `seq_len`; no row at
    all (no example, or every one dropped) is a `MotabInputError` saying why."""
    tokenized, format_stats = format_examples(examples, tokenizer,
                                              mask_flawed_student_segment=mask_flawed_student_segment,
                                              cutoff_len=cutoff_len, apply_chat_template=apply_chat_template,
                                              chat_template_kwargs=chat_template_kwargs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, pack_stats = pack_examples(tokenized, seq_len, pad_id=pad_id)
    if not rows:
        raise MotabInputError(f"no training rows from {len(examples)} examples ({format_stats.dropped_long_prompt} "
                              f"with a prompt that fills cutoff_len={cutoff_len}, {pack_stats.dropped_no_target} with "
                              f"no response token left in seq_len={seq_len}): give examples, or raise seq_len / "
                              "cutoff_len")
    return rows, SFTBuildStats(format=format_stats, pack=pack_stats)
