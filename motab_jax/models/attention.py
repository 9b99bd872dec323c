"""Grouped-query attention behind one interface, with interchangeable kernels.

`attention(q, k, v, mask_info, impl)`:
- "xla": plain einsum/softmax in float32; the CPU reference every other kernel is tested against.
- "jax": `jax.nn.dot_product_attention` (XLA lowering chosen by JAX).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash attention on NVIDIA GPUs
  (bf16/fp16 only); use it for training and prefill.
- "auto": "jax" (safe on every backend).

Masks are built from positions, never materialised per layer by callers: a query at index i may see a
key at index j when j <= i (causal, by index in the buffer) and both carry the same segment id.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -1e30


@jax.tree_util.register_dataclass
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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, impl: str = "auto") -> jax.Array:
    """q [B, T, H, D], k/v [B, S, K, D] with K dividing H -> [B, T, H, D]."""
    scale = q.shape[-1] ** -0.5
    dense = mask.dense()
    if impl == "xla":
        return _xla_attention(q, k, v, dense, scale)
    if impl in ("auto", "jax"):
        return jax.nn.dot_product_attention(q, k, v, mask=dense, scale=scale)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=dense, scale=scale, implementation="cudnn")
    raise ValueError(f"attention_impl={impl!r}; accepted: 'auto', 'xla', 'jax', 'cudnn'")
