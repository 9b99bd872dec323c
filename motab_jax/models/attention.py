"""Grouped-query attention behind one interface, with interchangeable kernels.

`attention(q, k, v, mask_info, impl)`:
- "xla": plain einsum/softmax in float32; the CPU reference every other kernel is tested against.
- "jax": `jax.nn.dot_product_attention` (XLA lowering chosen by JAX).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash attention on NVIDIA GPUs
  (bf16/fp16 only) for cache-free causal passes without segment ids; other cases fall back to "jax".
- "splash": the Pallas splash-attention kernel for TPU (block-sparse causal + segment ids, with its own
  backward pass), for cache-free forwards whose length is a multiple of 128; runs in Pallas interpret
  mode off TPU (how the tests check it on CPU). Other shapes fall back to "jax".
- "auto": "splash" on TPU where it fits, otherwise "jax" (safe on every backend).

Masks are built from positions, never materialised per layer by callers: a query at index i may see a
key at index j when j <= i (causal, by index in the buffer) and both carry the same segment id.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

NEG_INF = -1e30
ATTENTION_IMPLS = ("auto", "xla", "jax", "cudnn", "splash")


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


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, :, None], scores, NEG_INF)  # mask [B,1,T,S] -> [B,1,1,T,S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


SPLASH_BLOCK = 128


@functools.lru_cache(maxsize=None)
def _splash_kernel(length: int, group: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    causal = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(group)])
    block = min(SPLASH_BLOCK, length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa_single_device(causal, block_sizes=sizes, interpret=interpret)


def _splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None,
                      scale: float) -> jax.Array:
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    group = h // kv_heads
    kernel = _splash_kernel(t, group, jax.default_backend() != "tpu")
    # GQA as one multi-query kernel per KV head: [B, K, G, T, D] queries against [B, K, T, D] keys.
    q = (q * scale).reshape(b, t, kv_heads, group, d).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if segments is None:
        per_head = jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh))
        out = jax.vmap(per_head)(q, k, v)
    else:
        per_head = jax.vmap(lambda qh, kh, vh, seg: kernel(qh, kh, vh, segment_ids=seg), in_axes=(0, 0, 0, None))
        out = jax.vmap(per_head)(q, k, v, splash.SegmentIds(q=segments, kv=segments))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def splash_fits(q: jax.Array, mask: AttentionMask) -> bool:
    length = q.shape[1]
    return mask.self_attention and (length % SPLASH_BLOCK == 0 or length < SPLASH_BLOCK and length % 8 == 0)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, impl: str = "auto") -> jax.Array:
    """q [B, T, H, D], k/v [B, S, K, D] with K dividing H -> [B, T, H, D]."""
    scale = q.shape[-1] ** -0.5
    if impl == "auto":
        impl = "splash" if jax.default_backend() == "tpu" and splash_fits(q, mask) else "jax"
    if impl == "splash":
        if splash_fits(q, mask):
            return _splash_attention(q, k, v, mask.q_segment, scale)
        impl = "jax"
    if impl == "cudnn":
        # cuDNN's fused kernel takes a causal flag; an explicit mask would be materialised as a bias, so
        # only the unsegmented self-attention case uses it.
        if mask.self_attention and mask.q_segment is None:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
        impl = "jax"
    if impl == "xla":
        return _xla_attention(q, k, v, mask.dense(), scale)
    if impl == "jax":
        return jax.nn.dot_product_attention(q, k, v, mask=mask.dense(), scale=scale)
    raise ValueError(f"attention_impl={impl!r}; accepted: {ATTENTION_IMPLS}")
