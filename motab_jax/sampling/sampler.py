"""Batched sampling with a KV cache: one ragged prefill, then a `lax.while_loop` of decode steps.

Everything per step happens on the device: select a token for every row, record it (and its
log-probability), stop rows that emit a stop token or reach their budget, and extend the cache by one
token. Randomness is keyed by (seed, row id, step), so a row's output does not depend on which other
rows share its batch. The jitted functions take the model's split parameter state as an argument and
donate the cache.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from motab_jax.models.kv_cache import KVCache
from motab_jax.models.transformer import Decoder
from motab_jax.sampling.rules import Rule

PAD_ID = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The loop carry of `decode_loop`."""

    cache: KVCache
    logits: jax.Array  # [B, V] float32: next-token logits of every row
    tokens: jax.Array  # [B, max_new] int32: generated tokens (PAD_ID after a row stops)
    logprobs: jax.Array  # [B, max_new] float32: log pi(token) under the model at temperature 1
    num_generated: jax.Array  # [B] int32
    done: jax.Array  # [B] bool
    hit_stop: jax.Array  # [B] bool: stopped by a stop token (else by budget)
    step: jax.Array  # [] int32


@dataclasses.dataclass(frozen=True)
class SamplerLoop:
    """Static description of one compiled decode loop (hashable: a jit static argument)."""

    rule: Rule
    max_new_tokens: int
    stop_tokens: tuple[int, ...]

    def run(self, model: Decoder, state: DecodeState, row_keys: jax.Array, budgets: jax.Array) -> DecodeState:
        """Decode until every row is done or `max_new_tokens` steps ran. row_keys: [B] PRNG keys; budgets [B]."""
        stop = jnp.asarray(self.stop_tokens or (-1,), jnp.int32)

        def cond(s: DecodeState) -> jax.Array:
            return (s.step < self.max_new_tokens) & ~jnp.all(s.done)

        def body(s: DecodeState) -> DecodeState:
            keys = jax.vmap(lambda k: jax.random.fold_in(k, s.step))(row_keys)
            token = self.rule.select(s.logits, keys)
            token = jnp.where(s.done, PAD_ID, token)
            logprob = jnp.take_along_axis(jax.nn.log_softmax(s.logits), token[:, None], axis=-1)[:, 0]
            active = ~s.done
            tokens = s.tokens.at[:, s.step].set(token)
            logprobs = s.logprobs.at[:, s.step].set(jnp.where(active, logprob, 0.0))
            num_generated = s.num_generated + active
            is_stop = active & jnp.any(token[:, None] == stop[None, :], axis=-1)
            done = s.done | is_stop | (num_generated >= budgets)
            logits, cache = model.extend(token[:, None], s.cache, active.astype(jnp.int32), logits="last")
            return DecodeState(cache, logits, tokens, logprobs, num_generated, done, s.hit_stop | is_stop,
                               s.step + 1)

        return jax.lax.while_loop(cond, body, state)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _prefill(graphdef: Any, params: Any, cache: KVCache, tokens: jax.Array, lengths: jax.Array):
    model = nnx.merge(graphdef, params)
    return model.extend(tokens, cache, lengths, logits="last")


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def _decode(graphdef: Any, loop: SamplerLoop, params: Any, state: DecodeState, row_keys: jax.Array,
            budgets: jax.Array) -> DecodeState:
    return loop.run(nnx.merge(graphdef, params), state, row_keys, budgets)


def bucket(length: int, multiple: int = 64) -> int:
    """Round up to limit the number of compiled shapes."""
    return max(multiple, -(-length // multiple) * multiple)


def checked_prompt_width(model: Decoder, lengths: Sequence[int], max_new_tokens: int) -> int:
    """The bucketed width of prompts of `lengths`; raises when one is empty or a row would pass the model's
    positions."""
    if min(lengths) == 0:
        raise ValueError(f"prompt {list(lengths).index(0)} is empty: every prompt needs at least one token")
    width = bucket(max(lengths))
    if width + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({max(lengths)} tokens, padded to {width}) + max_new_tokens "
                         f"({max_new_tokens}) exceed the model's max_position_embeddings "
                         f"({model.config.max_position_embeddings}); shorten the prompt or lower max_new_tokens")
    return width


@dataclasses.dataclass
class BatchResult:
    tokens: np.ndarray  # [B, max_new] int32
    logprobs: np.ndarray  # [B, max_new] float32
    num_generated: np.ndarray  # [B]
    hit_stop: np.ndarray  # [B] bool


def sample_batch(model: Decoder, prompts: Sequence[Sequence[int]], row_ids: Sequence[int], *, rule: Rule,
                 max_new_tokens: int, stop_tokens: Sequence[int], seed: int, batch_size: int | None = None,
                 cache_dtype: str | None = None) -> BatchResult:
    """Sample continuations of token-id prompts (one row each); rows beyond len(prompts) pad the batch."""
    if not prompts:
        raise ValueError("no prompts to sample from")
    batch = batch_size or len(prompts)
    if len(prompts) > batch:
        raise ValueError(f"{len(prompts)} prompts do not fit a batch of {batch}")
    lengths = [len(p) for p in prompts]
    prompt_len = checked_prompt_width(model, lengths, max_new_tokens)
    tokens = np.full((batch, prompt_len), PAD_ID, np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, :len(prompt)] = prompt
    valid = np.zeros(batch, np.int32)
    valid[:len(prompts)] = lengths
    valid[len(prompts):] = 1  # padding rows: one token, then done from the start
    ids = np.zeros(batch, np.int64)
    ids[:len(prompts)] = row_ids
    graphdef, params = nnx.split(model)
    cache = model.init_cache(batch, prompt_len + max_new_tokens, cache_dtype)
    logits, cache = _prefill(graphdef, params, cache, jnp.asarray(tokens), jnp.asarray(valid))
    done = np.arange(batch) >= len(prompts)
    state = DecodeState(cache, logits, jnp.zeros((batch, max_new_tokens), jnp.int32),
                        jnp.zeros((batch, max_new_tokens), jnp.float32), jnp.zeros(batch, jnp.int32),
                        jnp.asarray(done), jnp.zeros(batch, bool), jnp.zeros((), jnp.int32))
    base = jax.random.key(seed)
    row_keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(ids, jnp.uint32))
    loop = SamplerLoop(rule, max_new_tokens, tuple(int(t) for t in stop_tokens))
    budgets = jnp.full((batch,), max_new_tokens, jnp.int32)
    state = _decode(graphdef, loop, params, state, row_keys, budgets)
    return BatchResult(np.asarray(state.tokens), np.asarray(state.logprobs), np.asarray(state.num_generated),
                       np.asarray(state.hit_stop))
