"""Attention over a `PagedKVCache` whose cost follows the live tokens, one implementation per backend.

Every path is called after the new tokens' keys/values were written to the pages, with queries q
[B, T, H, D] at positions `starts[b] + t` (t < num_valid[b]; later queries are padding whose output is
discarded). A query sees the cached positions before it and the new tokens up to itself.

- "reference" (CPU, and what every other path is tested against): blocked attention in pure JAX with an
  online softmax, a `lax.while_loop` over blocks of pages up to the batch's longest live sequence; no
  buffer is sized by the capacity.
- "pallas_gpu" (NVIDIA GPU): the cached prefix [0, starts) through the Pallas GPU paged-attention kernel
  (split-K flash decoding over each sequence's pages; the T queries are folded into the query-head axis so
  the prefix is read once per KV head), which we call with its softmax residuals; the T x T causal tail of
  new tokens densely; the two partial softmaxes merged by log-sum-exp. Exact; runs in Pallas interpret
  mode on CPU (how the tests check it).
- "pallas_tpu" (TPU): `ragged_paged_attention` (mixed prefill/decode, several queries per sequence) over
  the "combined" layout, with the valid tokens packed ragged. Its Pallas kernel does not run in interpret
  mode on CPU in jax 0.10.2; the tests check our inputs through the package's own Python reference
  (`ref_ragged_paged_attention`) and `experiments/bench_paged.py --preset gpu` checks the kernel on a TPU.
- "auto": "pallas_tpu" on TPU, "pallas_gpu" on GPU, "reference" elsewhere.

Attention sinks and sliding windows (gpt-oss, `AttentionExtras`) are computed by "reference" only: the loop
then starts at the first block inside the window, so a windowed layer reads O(window) positions per query.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from motab_jax.models.attention import NO_EXTRAS, AttentionExtras, window_allows

if TYPE_CHECKING:
    from motab_jax.models.paged_cache import PagedKVCache, PagedLayout

PAGED_IMPLS = ("auto", "reference", "pallas_gpu", "pallas_tpu")
NEG_INF = -1e30
# Positions per step of the reference loop: large enough to amortise the loop, small enough that a
# short live length reads little past itself.
REFERENCE_BLOCK_TOKENS = 256
# GPU kernel tiling: pages per compute block and the most split-K partitions.
GPU_PAGES_PER_BLOCK = 8
GPU_MAX_SPLITS = 16


def resolve_paged_impl(impl: str) -> str:
    if impl not in PAGED_IMPLS:
        raise ValueError(f"paged attention impl={impl!r}; accepted: {PAGED_IMPLS}")
    if impl == "auto":
        return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(jax.default_backend(), "reference")
    return impl


def layout_of(impl: str) -> PagedLayout:
    """The pool layout an implementation reads."""
    return "combined" if impl == "pallas_tpu" else "head_major"


def paged_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, cache: PagedKVCache, layer: jax.Array,
                    starts: jax.Array, num_valid: jax.Array, extras: AttentionExtras = NO_EXTRAS) -> jax.Array:
    """q [B, T, H, D], the new tokens' k_new / v_new [B, T, Hkv, D] (already in `cache`) -> [B, T, H, D]."""
    if cache.impl == "reference":
        positions = starts[:, None] + jnp.arange(q.shape[1], dtype=jnp.int32)[None, :]
        return reference_paged_attention(q, cache, layer, positions, starts + num_valid, extras=extras)
    if extras.any:
        raise ValueError(f"paged attention impl={cache.impl!r} has no attention sinks or sliding windows; this "
                         "model needs impl='reference' (what 'auto' picks for it)")
    if cache.impl == "pallas_gpu":
        return gpu_paged_attention(q, k_new, v_new, cache, layer, starts, num_valid,
                                   interpret=jax.default_backend() != "gpu")
    if cache.impl == "pallas_tpu":
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

        args, kwargs, unpack = tpu_kernel_inputs(q, cache, layer, starts, num_valid)
        return unpack(ragged_paged_attention(*args, **kwargs))
    raise ValueError(f"paged attention impl={cache.impl!r}; accepted: {PAGED_IMPLS}")


# ---------------------------------------------------------------------------------------------- reference
def reference_paged_attention(q: jax.Array, cache: PagedKVCache, layer: jax.Array, positions: jax.Array,
                              kv_len: jax.Array, block_tokens: int = REFERENCE_BLOCK_TOKENS,
                              extras: AttentionExtras = NO_EXTRAS) -> jax.Array:
    """Queries at `positions` [B, T] attend to cached positions j <= position with j < kv_len [B] (and inside
    the sliding window, with sinks in the softmax, when `extras` has them)."""
    b, t, h, d = q.shape
    hkv = cache.num_kv_heads
    pages_per_block = max(1, block_tokens // cache.page_size)
    block = pages_per_block * cache.page_size
    num_blocks = -(-cache.pages_per_seq // pages_per_block)
    table = jnp.pad(cache.page_table, ((0, 0), (0, num_blocks * pages_per_block - cache.pages_per_seq)))
    qg = (q * d ** -0.5).reshape(b, t, hkv, h // hkv, d)
    live_blocks = (jnp.max(kv_len) + block - 1) // block
    first_block = jnp.int32(0)
    if extras.window is not None:  # blocks wholly before every query's window are skipped
        earliest = jnp.min(jnp.where(positions >= 0, positions, jnp.iinfo(jnp.int32).max)) - extras.window + 1
        first_block = jnp.where(extras.window > 0, jnp.maximum(earliest, 0) // block, 0).astype(jnp.int32)

    def body(carry):
        i, m, l, acc = carry
        ids = jax.lax.dynamic_slice_in_dim(table, i * pages_per_block, pages_per_block, axis=1)
        k, v = cache.gather(layer, ids)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
        kv_pos = i * block + jnp.arange(block, dtype=jnp.int32)
        allowed = (kv_pos[None, None, :] <= positions[:, :, None]) & (kv_pos[None, None, :] < kv_len[:, None, None])
        allowed &= window_allows(positions[:, :, None], kv_pos[None, None, :], extras.window)
        allowed = allowed[:, None, None]  # [B, 1, 1, T, S]
        scores = jnp.where(allowed, scores, NEG_INF)
        m_next = jnp.maximum(m, scores.max(axis=-1))
        probs = jnp.where(allowed, jnp.exp(scores - m_next[..., None]), 0.0)
        correction = jnp.exp(m - m_next)
        l = l * correction + probs.sum(axis=-1)
        pv = jnp.einsum("bkgts,bskd->bkgtd", probs.astype(q.dtype), v.astype(q.dtype),
                        preferred_element_type=jnp.float32)
        return i + 1, m_next, l, acc * correction[..., None] + pv

    stats = jnp.full((b, hkv, h // hkv, t), NEG_INF, jnp.float32)
    init = (first_block, stats, jnp.zeros_like(stats), jnp.zeros((b, hkv, h // hkv, t, d), jnp.float32))
    _, m, l, acc = jax.lax.while_loop(lambda c: c[0] < live_blocks, body, init)
    if extras.sinks is not None:  # the sink joins the denominator only: rescale both to max(m, sink)
        sink = extras.sinks.astype(jnp.float32).reshape(1, hkv, h // hkv, 1)
        top = jnp.maximum(m, sink)
        l = l * jnp.exp(m - top) + jnp.exp(sink - top)
        acc = acc * jnp.exp(m - top)[..., None]
    out = acc / jnp.maximum(l, 1e-30)[..., None]  # padding rows with nothing visible give 0, not NaN
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


# ---------------------------------------------------------------------------------------------- GPU
def _gpu_prefix_one(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, table: jax.Array, length: jax.Array, *,
                    pages_per_block: int, splits: int, interpret: bool):
    """One sequence: q [Hkv * Q, D] (pre-scaled) against its pages -> unnormalised out [Hkv, Q, D] and the
    running max / sum [Hkv, Q] of the softmax, merged over the split-K partitions."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    from jax.experimental.pallas.ops.gpu import paged_attention as gpu_paged

    hkv, pool, page_size, d = k_pages.shape
    per_kv = q.shape[0] // hkv
    block_h = 16  # the kernel's minimum head block
    padded = -(-per_kv // block_h) * block_h
    q = jnp.pad(q.reshape(hkv, per_kv, d), ((0, 0), (0, padded - per_kv), (0, 0)))
    per_split = table.shape[0] // splits
    kernel = functools.partial(gpu_paged.paged_attention_kernel, num_heads=padded,
                               pages_per_compute_block=pages_per_block, mask_value=gpu_paged.DEFAULT_MASK_VALUE,
                               attn_logits_soft_cap=None)
    pages_spec = pl.BlockSpec((None, pool, page_size, d), lambda h, i, k: (h, 0, 0, 0))
    o, l, m = pl.pallas_call(
        kernel,
        grid=(hkv, padded // block_h, splits),
        in_specs=[pl.BlockSpec((None, block_h, d), lambda h, i, k: (h, i, 0)), pages_spec, None, pages_spec, None,
                  pl.BlockSpec((None, per_split), lambda h, i, k: (k, 0)), pl.BlockSpec((1,), lambda h, i, k: (0,))],
        out_specs=[pl.BlockSpec((None, None, block_h, d), lambda h, i, k: (k, h, i, 0)),
                   pl.BlockSpec((None, None, block_h), lambda h, i, k: (k, h, i)),
                   pl.BlockSpec((None, None, block_h), lambda h, i, k: (k, h, i))],
        out_shape=[jax.ShapeDtypeStruct((splits, hkv, padded, d), q.dtype),
                   jax.ShapeDtypeStruct((splits, hkv, padded), jnp.float32),
                   jax.ShapeDtypeStruct((splits, hkv, padded), jnp.float32)],
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        name="motab_paged_prefix",
    )(q, k_pages, None, v_pages, None, table.reshape(splits, per_split), length[None])
    o, l, m = o[:, :, :per_kv].astype(jnp.float32), l[:, :, :per_kv], m[:, :, :per_kv]
    m_all = m.max(axis=0)
    correction = jnp.exp(m - m_all[None])
    return (o * correction[..., None]).sum(axis=0), (l * correction).sum(axis=0), m_all


def gpu_tiling(pages_per_seq: int) -> tuple[int, int, int]:
    """(pages per compute block, split-K partitions, padded table width) for the GPU kernel."""
    pages_per_block = min(GPU_PAGES_PER_BLOCK, pages_per_seq)
    splits = max(1, min(GPU_MAX_SPLITS, pages_per_seq // pages_per_block))
    width = -(-pages_per_seq // (splits * pages_per_block)) * splits * pages_per_block
    return pages_per_block, splits, width


def gpu_paged_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, cache: PagedKVCache, layer: jax.Array,
                        starts: jax.Array, num_valid: jax.Array, *, interpret: bool) -> jax.Array:
    b, t, h, d = q.shape
    hkv = cache.num_kv_heads
    group = h // hkv
    qs = (q * d ** -0.5).reshape(b, t, hkv, group, d)
    pages_per_block, splits, width = gpu_tiling(cache.pages_per_seq)
    table = jnp.pad(cache.page_table, ((0, 0), (0, width - cache.pages_per_seq))) + layer * cache.num_pages
    # Fold the T queries into the query heads of their KV head: [B, Hkv * T * G, D].
    q_folded = qs.transpose(0, 2, 1, 3, 4).reshape(b, hkv * t * group, d).astype(cache.k_pages.dtype)
    prefix = functools.partial(_gpu_prefix_one, pages_per_block=pages_per_block, splits=splits, interpret=interpret)
    o_p, l_p, m_p = jax.vmap(prefix, in_axes=(0, None, None, 0, 0))(q_folded, cache.k_pages, cache.v_pages, table,
                                                                     starts.astype(jnp.int32))
    o_p = o_p.reshape(b, hkv, t, group, d)
    l_p, m_p = l_p.reshape(b, hkv, t, group), m_p.reshape(b, hkv, t, group)
    # The causal tail over the new tokens, read as stored (in the cache dtype).
    k_t = k_new.astype(cache.k_pages.dtype).astype(q.dtype)
    v_t = v_new.astype(cache.k_pages.dtype).astype(q.dtype)
    scores = jnp.einsum("btkgd,bskd->bktgs", qs, k_t, preferred_element_type=jnp.float32)
    idx = jnp.arange(t)
    allowed = (idx[None, :] <= idx[:, None])[None] & (idx[None, None, :] < num_valid[:, None, None])  # [B, T, S]
    allowed = allowed[:, None, :, None, :]
    scores = jnp.where(allowed, scores, NEG_INF)
    m_t = scores.max(axis=-1)
    probs = jnp.where(allowed, jnp.exp(scores - m_t[..., None]), 0.0)
    l_t = probs.sum(axis=-1)
    o_t = jnp.einsum("bktgs,bskd->bktgd", probs.astype(q.dtype), v_t, preferred_element_type=jnp.float32)
    m = jnp.maximum(m_p, m_t)
    w_p, w_t = jnp.exp(m_p - m), jnp.exp(m_t - m)
    out = (o_p * w_p[..., None] + o_t * w_t[..., None]) / jnp.maximum(l_p * w_p + l_t * w_t, 1e-30)[..., None]
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, h, d).astype(q.dtype)


# ---------------------------------------------------------------------------------------------- TPU
def tpu_kernel_inputs(q: jax.Array, cache: PagedKVCache, layer: jax.Array, starts: jax.Array,
                      num_valid: jax.Array):
    """Arguments of `ragged_paged_attention` for our batch, and the map of its output back to [B, T, H, D].

    The kernel takes the valid queries packed ragged ([sum num_valid, H, D] with cumulative lengths); a
    sequence's q_len queries sit at its last q_len positions, i.e. kv_len = starts + num_valid."""
    b, t, h, d = q.shape
    valid = (jnp.arange(t)[None, :] < num_valid[:, None]).reshape(-1)
    order = jnp.argsort(~valid, stable=True)  # valid tokens first, in (sequence, position) order
    packed = q.reshape(b * t, h, d)[order]
    cu_q_lens = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(num_valid).astype(jnp.int32)])
    args = (packed, cache.k_pages, (starts + num_valid).astype(jnp.int32), cache.page_table + layer * cache.num_pages,
            cu_q_lens, jnp.asarray([b], jnp.int32))

    def unpack(out: jax.Array) -> jax.Array:
        # The kernel returns a row per packed query slot; the package's reference only the valid ones.
        out = jnp.pad(out, ((0, b * t - out.shape[0]), (0, 0), (0, 0)))
        return jnp.zeros((b * t, h, d), out.dtype).at[order].set(out).reshape(b, t, h, d)

    return args, {"sm_scale": d ** -0.5}, unpack


__all__ = ["PAGED_IMPLS", "gpu_paged_attention", "gpu_tiling", "layout_of", "paged_attention",
           "reference_paged_attention", "resolve_paged_impl", "tpu_kernel_inputs"]
