"""The jitted model work of synthesis across vocabularies (`cross_engine`): decode chunks and (re)feed contexts.

Each model keeps its own paged KV cache over the slots, in its own vocabulary. Two batched operations serve both:
- `feed`: rewind rows to a position and feed them tokens (a prompt, a context re-encoded after a seam, a step to
  score), returning per row the summed log-probability of the fed tokens from a given index on, and the top-k
  entropy of the next-token distribution after the last fed token;
- `decode`: sample up to `chunk` tokens per live row (the pending-token convention of the main engine: the cache
  holds the context but its last token), stopping a row at the end of its step (delimiter automaton or step cap,
  when asked), at an end-of-sequence token or when its budget is spent.
With `groups` (a mesh whose `data` axis has G > 1 entries) both run once per engine group under `shard_map`: the
rows (slots) and the page pools split over `data` (each group's pool addressed by group-local page ids), the
weights replicated over it and split over the group's own devices as the sampling rules place them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from motab_jax.models.paged_cache import PagedKVCache
from motab_jax.motab.engine import over_groups, topk_entropy
from motab_jax.motab.transition import EngineTables
from motab_jax.sampling.rules import Rule

RUNNING, STOP_STEP, STOP_EOS, STOP_BUDGET = 0, 1, 2, 3


def cache_specs(cache: PagedKVCache) -> PagedKVCache:
    """How a cache splits over engine groups: its pool on the pool axis (one contiguous pool per group), the page
    table, lengths and drop counts on the slot axis."""
    pool = P(None, "data") if cache.layout == "head_major" else P("data")
    return dataclasses.replace(cache, k_pages=pool, v_pages=None if cache.v_pages is None else pool,
                               page_table=P("data"), lengths=P("data"), dropped=P("data"))


@functools.partial(jax.jit, static_argnums=(0, 6, 8), donate_argnums=(2,))
def feed(model_def: Any, params: Any, cache: PagedKVCache, tokens: jax.Array, start: jax.Array,
         num_valid: jax.Array, entropy_top_k: int, score_from: jax.Array, groups: Mesh | None = None
         ) -> tuple[PagedKVCache, jax.Array, jax.Array]:
    """Rows rewound to `start` [B] and fed tokens [B, T] (`num_valid` [B] of them; 0 leaves a row alone).

    Returns (cache, sum over i in [score_from, num_valid) of log p(tokens[i] | tokens before it) [B],
    top-k entropy after the last fed token [B]). The log-probability of tokens[i] comes from the logits at i - 1,
    so `score_from` >= 1."""
    def run(params, cache, tokens, start, num_valid, score_from):
        model = nnx.merge(model_def, params)
        cache = cache.with_lengths(jnp.where(num_valid > 0, start, cache.lengths))
        logits, cache = model.extend(tokens, cache, num_valid, logits="all")
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]: log p(tokens[i+1])
        index = jnp.arange(1, tokens.shape[1])[None, :]
        scored = (index >= score_from[:, None]) & (index < num_valid[:, None])
        last = jnp.take_along_axis(logits, jnp.maximum(num_valid - 1, 0)[:, None, None], axis=1)[:, 0]
        return cache, jnp.sum(jnp.where(scored, target, 0.0), axis=1), topk_entropy(last, entropy_top_k)

    rows = P("data")
    run = over_groups(run, groups, (P(), cache_specs(cache), rows, rows, rows, rows), (cache_specs(cache), rows, rows))
    return run(params, cache, tokens, start, num_valid, score_from)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeRows:
    """Per-row inputs and outputs of one `decode` call ([B] unless noted)."""

    keys: jax.Array  # PRNG key of the row's trajectory for this model
    position: jax.Array  # int32: tokens this model has sampled in the trajectory (folded into the key)
    pending: jax.Array  # int32: the context's last token (not in the cache)
    ctx_len: jax.Array  # int32: context tokens, `pending` included
    automaton: jax.Array  # int32: delimiter automaton state of the current step
    step_len: jax.Array  # int32: tokens of the current step so far
    budget: jax.Array  # int32: tokens the row may still add (0: the row does not run)
    stop: jax.Array  # int32: RUNNING or why the row stopped
    out: jax.Array  # [B, chunk] int32: the tokens of this call
    out_logp: jax.Array  # [B, chunk] float32: log p of each at temperature 1
    out_len: jax.Array  # int32


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 8), donate_argnums=(2, 7))
def decode(model_def: Any, params: Any, cache: PagedKVCache, rule: Rule, step_cap: int, stop_at_step_end: bool,
           tables: EngineTables, rows: DecodeRows, groups: Mesh | None = None) -> tuple[PagedKVCache, DecodeRows]:
    """Sample up to `chunk` tokens per running row (see the module docstring)."""
    specs = jax.tree.map(lambda _: P("data"), rows)
    run = over_groups(functools.partial(_decode_rows, model_def, rule, step_cap, stop_at_step_end), groups,
                      (P(), cache_specs(cache), P(), specs), (cache_specs(cache), specs))
    return run(params, cache, tables, rows)


def _decode_rows(model_def: Any, rule: Rule, step_cap: int, stop_at_step_end: bool, params: Any,
                 cache: PagedKVCache, tables: EngineTables, rows: DecodeRows) -> tuple[PagedKVCache, DecodeRows]:
    model = nnx.merge(model_def, params)
    chunk = rows.out.shape[1]
    b = rows.pending.shape[0]
    index = jnp.arange(b)

    def cond(carry):
        i, _, r = carry
        return (i < chunk) & jnp.any(r.stop == RUNNING)

    def body(carry):
        i, cache, r = carry
        live = r.stop == RUNNING
        cache = cache.with_lengths(jnp.where(live, r.ctx_len - 1, cache.lengths))
        logits, cache = model.extend(r.pending[:, None], cache, live.astype(jnp.int32), logits="last")
        keys = jax.vmap(jax.random.fold_in)(r.keys, r.position)
        token = rule.select(logits, keys)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), token[:, None], axis=-1)[:, 0]
        slot = jnp.where(live, r.out_len, chunk)
        step_len = r.step_len + live
        completes = tables.completes[r.automaton, token] | (step_len >= step_cap)
        is_eos = jnp.any(token[:, None] == tables.eos[None, :], axis=-1)
        budget = r.budget - live
        stop = jnp.where(is_eos, STOP_EOS, jnp.where(stop_at_step_end & completes, STOP_STEP,
                                                     jnp.where(budget <= 0, STOP_BUDGET, RUNNING)))
        r = dataclasses.replace(
            r, position=r.position + live, pending=jnp.where(live, token, r.pending), ctx_len=r.ctx_len + live,
            automaton=jnp.where(live, tables.next_state[r.automaton, token], r.automaton), step_len=step_len,
            budget=budget, stop=jnp.where(live, stop, r.stop), out=r.out.at[index, slot].set(token, mode="drop"),
            out_logp=r.out_logp.at[index, slot].set(logp, mode="drop"), out_len=r.out_len + live)
        return i + 1, cache, r

    _, cache, rows = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), cache, rows))
    return cache, rows
