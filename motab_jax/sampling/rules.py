"""Token-selection rules: greedy, and temperature sampling with optional top-k / top-p truncation.

Each rule is a small frozen dataclass (hashable, so it is a static argument of the jitted loops) with
`select(logits, key) -> tokens`. No rule sorts the vocabulary: top-k uses `lax.top_k` (a partial
selection) and top-p finds the nucleus threshold by bisection on probability mass, which is exact up
to float32 resolution and costs a few dozen masked sums over the vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -1e30
_BISECTION_STEPS = 32


@dataclasses.dataclass(frozen=True)
class Greedy:
    def select(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def distribution(self, logits: jax.Array) -> jax.Array:
        """Probabilities the rule samples from (one-hot for greedy) [..., V]."""
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)


def nucleus_mask(probs: jax.Array, top_p: float) -> jax.Array:
    """True for the smallest set of highest-probability tokens whose mass reaches `top_p` (ties kept).

    Bisection on a threshold tau: mass(tau) = sum of probs >= tau is non-increasing in tau; we want the
    largest tau with mass(tau) >= top_p. The set {p >= tau} is then exactly the sorted-cumsum nucleus.
    """
    lo = jnp.zeros(probs.shape[:-1], probs.dtype)  # mass(lo) >= top_p always holds
    hi = jnp.max(probs, axis=-1)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        mass = jnp.sum(jnp.where(probs >= mid[..., None], probs, 0.0), axis=-1)
        ok = mass >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, body, (lo, hi))
    # hi itself may already qualify (e.g. one token holds >= top_p of the mass).
    hi_ok = jnp.sum(jnp.where(probs >= hi[..., None], probs, 0.0), axis=-1) >= top_p
    tau = jnp.where(hi_ok, hi, lo)
    return probs >= tau[..., None]


@dataclasses.dataclass(frozen=True)
class Sample:
    """Temperature sampling; `top_k` = 0 and `top_p` = 1.0 disable truncation."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (use Greedy for 0)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    def truncated_logits(self, logits: jax.Array) -> jax.Array:
        """Temperature-scaled logits with tokens outside top-k / the nucleus set to -inf."""
        scaled = logits.astype(jnp.float32) / self.temperature
        if self.top_k and self.top_k < scaled.shape[-1]:
            kth = jax.lax.top_k(scaled, self.top_k)[0][..., -1:]
            scaled = jnp.where(scaled >= kth, scaled, NEG_INF)
        if self.top_p < 1.0:
            keep = nucleus_mask(jax.nn.softmax(scaled, axis=-1), self.top_p)
            scaled = jnp.where(keep, scaled, NEG_INF)
        return scaled

    def distribution(self, logits: jax.Array) -> jax.Array:
        return jax.nn.softmax(self.truncated_logits(logits), axis=-1)

    def select(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """logits [B, V], key: one PRNG key per row [B] -> tokens [B]."""
        truncated = self.truncated_logits(logits)
        return jax.vmap(lambda k, l: jax.random.categorical(k, l))(key, truncated).astype(jnp.int32)


Rule = Greedy | Sample


def make_rule(temperature: float, top_p: float = 1.0, top_k: int = 0) -> Rule:
    """Greedy at temperature 0, otherwise temperature sampling with the given truncation."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    return Greedy() if temperature == 0 else Sample(temperature=temperature, top_k=top_k, top_p=top_p)
