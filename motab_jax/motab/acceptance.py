"""Speculative acceptance (Leviathan et al. 2023; Chen et al. 2023), as one function of arrays.

The student drafts k tokens d_1..d_k from its draft distribution q; the teacher scores them in one forward,
giving its distribution p at each of the k + 1 positions. Draft i is accepted with probability
min(1, p_i(d_i) / q_i(d_i)), in order, until the first rejection; the token after the accepted prefix is a
sample of the residual max(p - q, 0) (renormalised) at the first rejected position, or, when every draft
was accepted, the teacher's own sample at position k + 1 (the bonus token). The committed tokens are then
distributed exactly as the teacher's samples, whatever q is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _at(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b]] for x [B, N, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 1)), axis=1)[:, 0]


def accept_drafts(drafts: jax.Array, p: jax.Array, q: jax.Array | None, uniforms: jax.Array,
                  residual_keys: jax.Array, bonus: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rejection sampling of a drafted chunk.

    drafts [B, k] int32; p [B, k, V]: the target (teacher) distribution at each draft's position; q [B, k, V]:
    the draft distribution (None: greedy drafts, i.e. one-hot q); uniforms [B, k] in [0, 1); residual_keys [B]
    PRNG keys; bonus [B]: the target's sample after the last draft.
    Returns (accepted [B] int32 in 0..k, next_token [B] int32: the token committed after the accepted prefix).
    """
    k = drafts.shape[1]
    p_drafts = jnp.take_along_axis(p, drafts[..., None], axis=-1)[..., 0]
    q_drafts = jnp.ones_like(p_drafts) if q is None else jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    # u * q <= p  <=>  u <= p / q, without dividing by a zero q.
    accepted = jnp.sum(jnp.cumprod(uniforms * q_drafts <= p_drafts, axis=1), axis=1).astype(jnp.int32)
    at = jnp.minimum(accepted, k - 1)
    p_at = _at(p, at)
    q_at = jax.nn.one_hot(_at(drafts, at), p_at.shape[-1]) if q is None else _at(q, at)
    residual = jnp.maximum(p_at - q_at, 0.0)
    # p == q at the rejected position cannot reject; a zero residual only arises from rounding: fall back to p.
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_at)
    resampled = jax.vmap(lambda key, r: jax.random.categorical(key, jnp.log(r)))(residual_keys, residual)
    return accepted, jnp.where(accepted < k, resampled, bonus).astype(jnp.int32)
