"""The key/value cache shared by the sampler and the synthesis engine.

One buffer per key and value for all layers, `[layers, batch, max_length, kv_heads, head_dim]`, plus
the number of valid tokens of each sequence. A sequence's tokens occupy slots 0..length-1 and the slot
index is the token's RoPE position, so:
- extending writes new tokens at slots `length ..` (each sequence at its own position);
- rewinding a sequence is only `length = p` (no copy): slots >= p are overwritten by whatever is
  written next, and attention masks every slot after the query's own position.
Jitted functions that take a cache should donate it so XLA updates the buffers in place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from motab_jax.models.sharding import LogicalAxes

CACHE_AXES: LogicalAxes = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
LENGTHS_AXES: LogicalAxes = ("batch",)


class SequenceLengths:
    """Length bookkeeping shared by the dense and the paged cache (frozen dataclasses with `lengths`)."""

    lengths: jax.Array  # [batch] int32: valid tokens per sequence = position of the next token

    def rewind(self, lengths: jax.Array):
        """Move each sequence back to `lengths` [batch] tokens (only lowers a length; never copies)."""
        return dataclasses.replace(self, lengths=jnp.minimum(self.lengths, jnp.asarray(lengths, jnp.int32)))

    def with_lengths(self, lengths: jax.Array):
        """Set the valid length of each sequence (e.g. per-sequence start positions before a prefill)."""
        return dataclasses.replace(self, lengths=jnp.asarray(lengths, jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache(SequenceLengths):
    keys: jax.Array  # [layers, batch, max_length, kv_heads, head_dim]
    values: jax.Array  # [layers, batch, max_length, kv_heads, head_dim]
    lengths: jax.Array  # [batch] int32: valid tokens per sequence = position of the next token

    @classmethod
    def zeros(cls, num_layers: int, batch: int, max_length: int, num_kv_heads: int, head_dim: int,
              dtype: jnp.dtype = jnp.bfloat16) -> KVCache:
        shape = (num_layers, batch, max_length, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]
