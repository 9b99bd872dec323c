"""A paged key/value cache: one page pool per model, a page table and a length per sequence.

Memory is the pool (`num_pages` pages of `page_size` positions for every layer), sized from a byte
budget, not batch x capacity: a sequence holds only the pages its live tokens need, so 64 slots with a
32K capacity and a small pool allocate the pool's bytes.

Layout (chosen by the attention kernel that reads it, see `paged_attention.PAGED_IMPLS`):
- "head_major": `k_pages` and `v_pages` [kv_heads, layers * num_pages, page_size, head_dim], as the GPU
  Pallas paged kernel wants them; also the CPU reference's layout.
- "combined": `k_pages` [layers * num_pages, page_size, 2 * kv_heads, head_dim] with K and V interleaved
  per head (K0, V0, K1, V1, ...), as the TPU ragged paged kernel wants it; `v_pages` is None.
The layers share one pool axis: layer l's page p is pool page `l * num_pages + p`. A kernel therefore reads
the whole pool in place with page ids offset by the layer, and no per-layer slice of the pool is copied
inside the layer scan.

Page 0 of every layer is the null page: it is never handed out, a page-table entry of 0 means "no page",
and it stays zero, so a kernel that reads a whole compute block of pages past a sequence's length reads
zeros, never another sequence's data. A write to a position whose page-table entry is 0 is dropped and
counted in `dropped` (per sequence), so running past the allocated pages is visible to the caller.

Allocation lives on the host (`PageAllocator`, as in tpu-inference): before a device loop the host gives
every live sequence pages for its next N tokens and commits the table; inside the loop the table is fixed
and a rewind only lowers `lengths` (`rewind`, shared with the dense cache; the pages stay with the
sequence until the host trims them).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from motab_jax.models.kv_cache import SequenceLengths
from motab_jax.models.sharding import LogicalAxes

PagedLayout = Literal["head_major", "combined"]
NULL_PAGE = 0
HEAD_MAJOR_AXES: LogicalAxes = ("kv_heads", "cache_pages", "page", "head_dim")
COMBINED_AXES: LogicalAxes = ("cache_pages", "page", "kv_heads", "head_dim")


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: jnp.dtype | str) -> int:
    """Bytes one cached token takes: keys and values of every layer."""
    return 2 * num_layers * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize


def pages_for_budget(budget_bytes: float, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int,
                     dtype: jnp.dtype | str) -> int:
    """Pages (null page included) a byte budget holds."""
    per_page = page_size * kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)
    return int(budget_bytes // per_page)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k_pages", "v_pages", "page_table", "lengths", "dropped"],
                   meta_fields=["num_layers", "page_size", "impl"])
@dataclasses.dataclass(frozen=True)
class PagedKVCache(SequenceLengths):
    k_pages: jax.Array  # see the module docstring for the two layouts
    v_pages: jax.Array | None
    page_table: jax.Array  # [batch, pages_per_seq] int32 page ids in [0, num_pages); 0 = no page
    lengths: jax.Array  # [batch] int32: valid tokens per sequence = position of the next token
    dropped: jax.Array  # [batch] int32: tokens written where the sequence had no page (must stay 0)
    num_layers: int
    page_size: int
    impl: str  # the resolved paged attention implementation, which fixes the layout

    @classmethod
    def zeros(cls, *, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int, page_size: int,
              batch: int, pages_per_seq: int, dtype: jnp.dtype | str = jnp.bfloat16,
              impl: str = "auto") -> PagedKVCache:
        from motab_jax.models.paged_attention import layout_of, resolve_paged_impl

        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: the pool needs the null page and at least one more")
        if page_size < 1 or pages_per_seq < 1 or batch < 1:
            raise ValueError(f"page_size={page_size}, pages_per_seq={pages_per_seq}, batch={batch}: must be >= 1")
        impl = resolve_paged_impl(impl)
        pool = num_layers * num_pages
        if layout_of(impl) == "head_major":
            shape = (num_kv_heads, pool, page_size, head_dim)
            k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
        else:
            k, v = jnp.zeros((pool, page_size, 2 * num_kv_heads, head_dim), dtype), None
        # Separate buffers for lengths and dropped: a jitted extend donates both.
        return cls(k, v, jnp.zeros((batch, pages_per_seq), jnp.int32), jnp.zeros((batch,), jnp.int32),
                   jnp.zeros((batch,), jnp.int32), num_layers, page_size, impl)

    # ------------------------------------------------------------------ shapes
    @property
    def layout(self) -> PagedLayout:
        return "head_major" if self.v_pages is not None else "combined"

    @property
    def batch_size(self) -> int:
        return self.page_table.shape[0]

    @property
    def pages_per_seq(self) -> int:
        return self.page_table.shape[1]

    @property
    def max_length(self) -> int:
        """The most positions one sequence can address (its page-table width x page size)."""
        return self.pages_per_seq * self.page_size

    @property
    def num_pages(self) -> int:
        """Pages per layer in the pool, the null page included."""
        pool = self.k_pages.shape[1] if self.layout == "head_major" else self.k_pages.shape[0]
        return pool // self.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.k_pages.shape[0] if self.layout == "head_major" else self.k_pages.shape[2] // 2

    @property
    def nbytes(self) -> int:
        """Bytes of the pool (the page table and lengths are negligible)."""
        return sum(a.size * a.dtype.itemsize for a in (self.k_pages, self.v_pages) if a is not None)

    # ------------------------------------------------------------------ pages (rewind: SequenceLengths)
    def with_page_table(self, table: np.ndarray | jax.Array) -> PagedKVCache:
        table = jnp.asarray(table, jnp.int32)
        if table.shape != self.page_table.shape:
            raise ValueError(f"page table shape {table.shape} != the cache's {self.page_table.shape}")
        return dataclasses.replace(self, page_table=table)

    def shardings(self, mesh: jax.sharding.Mesh, rules: Mapping[str, Any] | None = None) -> PagedKVCache:
        """Where each array of the cache lives on `mesh` by the sharding rules (default: the training rules): pools
        split over KV heads (and, under `SAMPLING_RULES`, over `data` on the pool axis: one contiguous pool per
        engine group), the page table, lengths and drop counts split like the batch. A rule set that splits the
        batch must split the pool the same way (the engine's groups run under `shard_map` with group-local page
        ids). Works on a cache of `jax.ShapeDtypeStruct`s too (`jax.eval_shape`)."""
        from motab_jax.models.sharding import DEFAULT_RULES, logical_sharding

        rules = rules or DEFAULT_RULES
        axes = HEAD_MAJOR_AXES if self.layout == "head_major" else COMBINED_AXES
        pool = lambda a: None if a is None else logical_sharding(mesh, axes, a.shape, rules)
        per_seq = lambda a: logical_sharding(mesh, ("batch",) + (None,) * (len(a.shape) - 1), a.shape, rules)
        return dataclasses.replace(self, k_pages=pool(self.k_pages), v_pages=pool(self.v_pages),
                                   page_table=per_seq(self.page_table), lengths=per_seq(self.lengths),
                                   dropped=per_seq(self.dropped))

    def placed(self, mesh: jax.sharding.Mesh, rules: Mapping[str, Any] | None = None) -> PagedKVCache:
        """The cache on `mesh` as `shardings` says (from one process's arrays)."""
        return jax.tree.map(jax.device_put, self, self.shardings(mesh, rules))

    # ------------------------------------------------------------------ device-side access
    def page_slots(self, positions: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Where positions [B, T] live, the same for every layer: (page-table entry, offset in the page,
        whether a `valid` [B, T] position has a page). Computed once per forward, used by every layer's
        `write`; `valid & ~paged` are the writes that are dropped."""
        page_index = positions // self.page_size
        entry = jnp.take_along_axis(self.page_table, jnp.clip(page_index, 0, self.pages_per_seq - 1), axis=1)
        paged = valid & (page_index < self.pages_per_seq) & (entry != NULL_PAGE)
        return entry, positions % self.page_size, paged

    def write(self, layer: jax.Array, slots: tuple[jax.Array, jax.Array, jax.Array], k: jax.Array,
              v: jax.Array) -> PagedKVCache:
        """Write k/v [B, T, kv_heads, D] of `layer` at `slots` (from `page_slots`); positions without a page
        are dropped (the caller counts them in `dropped`: this runs once per layer)."""
        entry, offset, paged = slots
        pool_size = self.num_layers * self.num_pages
        page = jnp.where(paged, layer * self.num_pages + entry, pool_size)  # pool_size: dropped by mode="drop"
        if self.layout == "head_major":
            kh = jnp.moveaxis(k.astype(self.k_pages.dtype), 2, 0)  # [Hkv, B, T, D]
            vh = jnp.moveaxis(v.astype(self.v_pages.dtype), 2, 0)
            k_pages = self.k_pages.at[:, page, offset].set(kh, mode="drop")
            v_pages = self.v_pages.at[:, page, offset].set(vh, mode="drop")
            return dataclasses.replace(self, k_pages=k_pages, v_pages=v_pages)
        b, t, h, d = k.shape
        kv = jnp.stack([k, v], axis=3).reshape(b, t, 2 * h, d).astype(self.k_pages.dtype)
        return dataclasses.replace(self, k_pages=self.k_pages.at[page, offset].set(kv, mode="drop"))

    def gather(self, layer: jax.Array, page_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values of `layer` on pages [B, n] -> each [B, n * page_size, kv_heads, D]."""
        flat = layer * self.num_pages + page_ids
        b, n = page_ids.shape
        if self.layout == "head_major":
            k = self.k_pages[:, flat]  # [Hkv, B, n, page, D]
            v = self.v_pages[:, flat]
            h, d = k.shape[0], k.shape[-1]
            to_rows = lambda a: jnp.moveaxis(a, 0, -2).reshape(b, n * self.page_size, h, d)
            return to_rows(k), to_rows(v)
        kv = self.k_pages[flat]  # [B, n, page, 2 Hkv, D]
        h, d = kv.shape[-2] // 2, kv.shape[-1]
        kv = kv.reshape(b, n * self.page_size, h, 2, d)
        return kv[..., 0, :], kv[..., 1, :]


class PagePoolExhausted(RuntimeError):
    """The pool has fewer free pages than a request needs."""


class PageAllocator:
    """Host-side page bookkeeping for one `PagedKVCache` (numpy; cheap, O(pages moved) per call).

    `ensure(seq, n)` gives a sequence pages for positions [0, n); `trim(seq, n)` returns the pages wholly
    past position n (a rewind); `free(seq)` returns all of them. `commit(cache)` puts the table on the
    device. Page ids are per layer (the cache offsets them by the layer)."""

    def __init__(self, num_pages: int, page_size: int, batch: int, pages_per_seq: int):
        self.num_pages, self.page_size, self.pages_per_seq = num_pages, page_size, pages_per_seq
        self.table = np.zeros((batch, pages_per_seq), np.int32)
        self.held = np.zeros((batch,), np.int32)  # pages each sequence holds (a prefix of its table row)
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))  # a stack; lowest ids handed out first

    @classmethod
    def for_cache(cls, cache: PagedKVCache) -> PageAllocator:
        return cls(cache.num_pages, cache.page_size, cache.batch_size, cache.pages_per_seq)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_needed(self, seq: int, num_tokens: int) -> int:
        """More pages `seq` needs to hold positions [0, num_tokens)."""
        return max(0, math.ceil(num_tokens / self.page_size) - int(self.held[seq]))

    def ensure(self, seq: int, num_tokens: int) -> None:
        """Give `seq` pages for positions [0, num_tokens); raises PagePoolExhausted or ValueError."""
        want = math.ceil(num_tokens / self.page_size)
        if want > self.pages_per_seq:
            raise ValueError(f"sequence {seq}: {num_tokens} tokens need {want} pages but a sequence addresses at "
                             f"most pages_per_seq={self.pages_per_seq} ({self.pages_per_seq * self.page_size} tokens)")
        need = want - int(self.held[seq])
        if need <= 0:
            return
        if need > len(self._free):
            raise PagePoolExhausted(f"sequence {seq} needs {need} more pages for {num_tokens} tokens; "
                                    f"{len(self._free)} of {self.num_pages - 1} are free")
        start = int(self.held[seq])
        for i in range(start, want):
            self.table[seq, i] = self._free.pop()
        self.held[seq] = want

    def trim(self, seq: int, num_tokens: int) -> None:
        """Return the pages of `seq` that lie wholly past position `num_tokens` (after a rewind)."""
        keep = math.ceil(max(num_tokens, 0) / self.page_size)
        for i in range(int(self.held[seq]) - 1, keep - 1, -1):
            self._free.append(int(self.table[seq, i]))
            self.table[seq, i] = NULL_PAGE
        self.held[seq] = min(int(self.held[seq]), keep)

    def free(self, seq: int) -> None:
        self.trim(seq, 0)

    def commit(self, cache: PagedKVCache) -> PagedKVCache:
        return cache.with_page_table(self.table)
