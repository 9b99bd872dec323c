"""Grouped-query attention behind one interface, with interchangeable kernels.

`attention(q, k, v, mask_info, impl)`:
- "xla": plain einsum/softmax in float32; the CPU reference every other kernel is tested against.
- "jax": `jax.nn.dot_product_attention` (XLA lowering chosen by JAX).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash attention on NVIDIA GPUs
  (bf16/fp16 only) for cache-free causal passes without segment ids; other cases fall back to "jax".
- "splash": the Pallas splash-attention kernel for TPU (block-sparse causal + segment ids, with its own
  backward pass), for cache-free forwards whose length is a multiple of 128; runs in Pallas interpret
  mode off TPU (how the tests check it on CPU). Other shapes fall back to "jax".
- "pallas_gpu": the Pallas (Triton) flash-attention kernel for NVIDIA GPUs
  (`jax.experimental.pallas.ops.gpu.attention.mha`: causal + segment ids, its own backward pass, O(T)
  memory), for cache-free forwards whose length tiles into power-of-two blocks of 16..128 (any multiple
  of 16) and head_dim >= 16; GQA by repeating each KV head over its query group (the kernel wants as many
  KV heads as query heads). Runs in Pallas interpret mode off GPU. Other shapes fall back to "jax".
- "auto": on TPU "splash" where it fits; on GPU, cache-free passes use "cudnn" when unsegmented in
  bf16/fp16 (head_dim <= 128, a multiple of 8), otherwise "pallas_gpu" where it fits; everything else
  (and CPU) "jax" (safe everywhere).

`resolve_impl` says which kernel a call really runs, so the memory preflight can tell whether a
configuration materialises dense [T, S] float32 scores ("xla", "jax") or not.

Masks are built from positions, never materialised per layer by callers: a query at index i may see a
key at index j when j <= i (causal, by index in the buffer) and both carry the same segment id.

`AttentionExtras` carries what gpt-oss adds: a learned per-head sink logit in every softmax (dropped after
it, so rows sum to less than 1) and a per-layer sliding window (key j visible iff i - window < j). "splash"
takes both (its `sinks` argument; a local mask, the window-or-full choice per layer made by `lax.cond`); the
other calls with extras run "xla" (cuDNN, the Triton kernel and `jax.nn.dot_product_attention` take no sinks
in jax 0.10.2).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import get_args

import jax
import jax.numpy as jnp

from motab_jax.models.config import AttentionImpl

NEG_INF = -1e30
# One source of truth for the accepted names: the config's Literal (config.py imports nothing from models).
ATTENTION_IMPLS: tuple[str, ...] = get_args(AttentionImpl)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q_index", "kv_index", "q_segment", "kv_segment"],
                   meta_fields=["self_attention"])
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """What each query may see: causal over buffer indices, optionally within a segment.

    q_index [B, T] and kv_index [B, S] are indices into the key buffer (for a KV cache: the slots, which
    equal RoPE positions; for packed training: 0..T-1 while RoPE positions restart per segment).
    """

    q_index: jax.Array
    kv_index: jax.Array
    q_segment: jax.Array | None = None  # [B, T] int32
    kv_segment: jax.Array | None = None  # [B, S] int32
    # True when keys are the queries themselves with q_index == kv_index == 0..T-1 (no cache): the
    # case block-sparse causal kernels handle.
    self_attention: bool = False

    def dense(self) -> jax.Array:
        """Boolean mask [B, 1, T, S]."""
        mask = self.kv_index[:, None, :] <= self.q_index[:, :, None]
        if self.q_segment is not None:
            mask &= self.q_segment[:, :, None] == self.kv_segment[:, None, :]
        return mask[:, None]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["sinks", "window"], meta_fields=["window_size"])
@dataclasses.dataclass(frozen=True)
class AttentionExtras:
    """Per-layer attention options beyond causal masking (gpt-oss); None = absent."""

    sinks: jax.Array | None = None  # [H]: a logit per head that joins every softmax and is then dropped
    window: jax.Array | None = None  # int32 scalar: keys at positions > query position - window; 0 = full
    # The one nonzero window of the model's layers, for kernels that need it static (0: none, or several).
    window_size: int = 0

    @property
    def any(self) -> bool:
        return self.sinks is not None or self.window is not None


NO_EXTRAS = AttentionExtras()


def window_allows(q_pos: jax.Array, kv_pos: jax.Array, window: jax.Array | None) -> jax.Array | bool:
    """Whether a key at `kv_pos` is inside the query's sliding window (broadcasting; True without one)."""
    if window is None:
        return True
    return (window <= 0) | (kv_pos > q_pos - window)


def softmax_with_sinks(scores: jax.Array, sinks: jax.Array | None) -> jax.Array:
    """Softmax over the last axis of float32 scores [B, K, G, T, S]; with sinks [K * G] each row's
    denominator also holds exp(sink) (the sink column is dropped)."""
    if sinks is None:
        return jax.nn.softmax(scores, axis=-1)
    b, kv_heads, group = scores.shape[:3]
    sink = sinks.astype(jnp.float32).reshape(1, kv_heads, group, 1, 1)
    top = jnp.maximum(scores.max(axis=-1, keepdims=True), sink)
    exp = jnp.exp(scores - top)
    return exp / (exp.sum(axis=-1, keepdims=True) + jnp.exp(sink - top))


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                   sinks: jax.Array | None = None) -> jax.Array:
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, :, None], scores, NEG_INF)  # mask [B,1,T,S] -> [B,1,1,T,S]
    probs = softmax_with_sinks(scores, sinks).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


SPLASH_BLOCK = 128


@functools.lru_cache(maxsize=None)
def _splash_kernel(length: int, group: int, interpret: bool, window: int = 0):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    # A window w: keys q - (w - 1) .. q, which the local mask's (left, right) = (w - 1, 0) says exactly.
    one = (splash.LocalMask((length, length), (window - 1, 0), 0) if window else
           splash.CausalMask((length, length)))
    block = min(SPLASH_BLOCK, length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # Concrete mask tables even when first built inside a trace: the kernel is cached across traces.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mqa_single_device(splash.MultiHeadMask([one] * group), block_sizes=sizes,
                                                    interpret=interpret)


def _splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None,
                      scale: float, extras: AttentionExtras = NO_EXTRAS) -> jax.Array:
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    group = h // kv_heads
    interpret = jax.default_backend() != "tpu"
    # GQA as one multi-query kernel per KV head: [B, K, G, T, D] queries against [B, K, T, D] keys.
    q = (q * scale).reshape(b, t, kv_heads, group, d).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    sinks = None if extras.sinks is None else extras.sinks.astype(jnp.float32).reshape(kv_heads, group)
    seg = None if segments is None else splash.SegmentIds(q=segments, kv=segments)

    def run(kernel):
        per_head = jax.vmap(lambda qh, kh, vh, sh, s: kernel(qh, kh, vh, segment_ids=s, sinks=sh),
                            in_axes=(0, 0, 0, None if sinks is None else 0, None))
        return jax.vmap(per_head, in_axes=(0, 0, 0, None, None if seg is None else 0))(q, k, v, sinks, seg)

    full = _splash_kernel(t, group, interpret)
    if extras.window is None:
        out = run(full)
    else:  # the layer's window is scanned data: both kernels compiled, the layer's one run
        windowed = _splash_kernel(t, group, interpret, extras.window_size)
        out = jax.lax.cond(extras.window > 0, lambda: run(windowed), lambda: run(full))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def splash_fits(q: jax.Array, mask: AttentionMask) -> bool:
    return mask.self_attention and _splash_tiles(q.shape[1])


def _splash_tiles(length: int) -> bool:
    return length % SPLASH_BLOCK == 0 or length < SPLASH_BLOCK and length % 8 == 0


# Forward tiles of the Triton kernel: Triton needs power-of-two block extents of at least 16 (tl.dot), and
# the kernel reads whole blocks without bounds masks, so the length must be a multiple of the block.
PALLAS_GPU_BLOCKS = (128, 64, 32, 16)
# Backward tiles: the fused dK/dV + dQ kernel keeps [block, head_dim] float32 accumulators per program;
# 32 is the kernel's own default (larger tiles may run faster but risk the shared-memory limit).
PALLAS_GPU_BACKWARD_BLOCK = 32


def _pallas_gpu_block(length: int, head_dim: int) -> int:
    """The forward tile for this length, or 0 when the kernel cannot tile it."""
    if head_dim < 16:
        return 0
    return next((b for b in PALLAS_GPU_BLOCKS if length % b == 0), 0)


def _pallas_gpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None,
                          scale: float) -> jax.Array:
    from jax.experimental.pallas.ops.gpu import attention as pallas_mha

    b, t, h, d = q.shape
    group = h // k.shape[2]
    block = _pallas_gpu_block(t, d)
    back = min(PALLAS_GPU_BACKWARD_BLOCK, block)
    sizes = pallas_mha.BlockSizes(block_q=block, block_k=block, block_q_dkv=back, block_kv_dkv=back,
                                  block_q_dq=back, block_kv_dq=back)
    # The kernel indexes K/V by the query head, so GQA repeats each KV head over its group: [B, T, H, D],
    # the size of q (O(T)); the repeat's transpose sums dK/dV back over the group. The kernel keeps these
    # repeated K/V as its residuals, G times the unrepeated ones.
    if group > 1:
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    out = pallas_mha.mha(q, k, v, segments, sm_scale=scale, causal=True, block_sizes=sizes,
                         interpret=jax.default_backend() != "gpu")
    return out.astype(q.dtype)


def resolve_impl(impl: str, *, self_attention: bool, segmented: bool, length: int, head_dim: int,
                 dtype: jnp.dtype, backend: str | None = None) -> str:
    """The kernel `attention` really runs for `impl` on these shapes ("xla", "jax", "cudnn", "splash" or
    "pallas_gpu"): "auto" resolved for `backend` (default: JAX's), fallbacks for shapes a kernel cannot take.
    "xla" and "jax" materialise dense [T, S] float32 scores per head; the others do not."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}; accepted: {ATTENTION_IMPLS}")
    backend = backend or jax.default_backend()
    pallas_ok = self_attention and _pallas_gpu_block(length, head_dim) > 0
    # cuDNN's fused kernel takes a causal flag; an explicit mask would be materialised as a bias, so only
    # the unsegmented self-attention case uses it.
    cudnn_ok = self_attention and not segmented
    if impl == "auto":
        if backend == "tpu":
            impl = "splash"
        elif (backend == "gpu" and cudnn_ok and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
              and head_dim <= 128 and head_dim % 8 == 0):
            # The head sizes every cuDNN flash version accepts (an explicit "cudnn" passes any through).
            impl = "cudnn"
        elif backend == "gpu":
            impl = "pallas_gpu"
        else:
            impl = "jax"
    if impl == "splash" and not (self_attention and _splash_tiles(length)):
        impl = "jax"
    if impl == "pallas_gpu" and not pallas_ok:
        impl = "jax"
    if impl == "cudnn" and not cudnn_ok:
        impl = "jax"
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, impl: str = "auto",
              extras: AttentionExtras = NO_EXTRAS) -> jax.Array:
    """q [B, T, H, D], k/v [B, S, K, D] with K dividing H -> [B, T, H, D]."""
    scale = q.shape[-1] ** -0.5
    if extras.any:
        splash_ok = extras.window is None or extras.window_size > 0
        if splash_ok and resolve_impl(impl, self_attention=mask.self_attention, segmented=mask.q_segment is not None,
                                      length=q.shape[1], head_dim=q.shape[-1], dtype=q.dtype) == "splash":
            return _splash_attention(q, k, v, mask.q_segment, scale, extras)
        dense = mask.dense() & window_allows(mask.q_index[:, None, :, None], mask.kv_index[:, None, None, :],
                                             extras.window)
        return _xla_attention(q, k, v, dense, scale, extras.sinks)
    impl = resolve_impl(impl, self_attention=mask.self_attention, segmented=mask.q_segment is not None,
                        length=q.shape[1], head_dim=q.shape[-1], dtype=q.dtype)
    if impl == "splash":
        return _splash_attention(q, k, v, mask.q_segment, scale)
    if impl == "pallas_gpu":
        return _pallas_gpu_attention(q, k, v, mask.q_segment, scale)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
    if impl == "xla":
        return _xla_attention(q, k, v, mask.dense(), scale)
    return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), scale=scale)
