"""One jitted draft-verify iteration for every slot, the device loop around it, and slot starts.

Per iteration (all slots at once, whatever their mode):
1. the student drafts k tokens from each slot's context (EXPLORE: its real samples; TEACHER: drafts for
   speculative decoding);
2. the teacher runs ONE forward over [pending, d_1..d_k], giving for each drafted token its teacher
   log-probability and the top-k entropy of every state, plus the teacher's own samples;
3. each slot turns the chunk into committed tokens: EXPLORE keeps the drafts (token-level SKD may
   replace one), TEACHER keeps the prefix accepted by rejection sampling plus a residual or bonus token;
4. a scan over the committed tokens applies the policy (`transition.apply_tokens`): step boundaries, V_T and
   eps at each step end, breach -> root cause t* -> rewind the context, teacher budgets, finishing.

Both caches are paged: the host gives every live slot pages for one sync of growth before each device loop
(`scheduler.Scheduler`), so inside the loop no write lacks a page (`cache.dropped` stays zero, which the
host checks). Rows that are not live write nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from motab_jax.models.paged_cache import PagedKVCache
from motab_jax.motab.acceptance import accept_drafts
from motab_jax.motab.policies import Policy
from motab_jax.motab.state import (
    EXPLORE,
    RECORD_FIELDS,
    SLOT_FIELDS,
    SRC_STUDENT,
    SRC_TEACHER,
    TEACHER,
    EngineState,
    set_slots,
    start_values,
)
from motab_jax.motab.transition import EngineTables, apply_tokens
from motab_jax.sampling.rules import Greedy, Rule


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Everything static about the loop (hashable: a jit static argument)."""

    policy: Policy
    student_rule: Rule  # exploration sampling (spec: temperature 0.6)
    teacher_rule: Rule  # the teacher's sampling distribution (spec: temperature 0.6)
    draft_rule: Rule  # how the student drafts for speculative teacher decoding
    draft_len: int = 8  # k
    entropy_top_k: int = 20
    step_cap: int = 8192
    traj_cap: int = 32768
    teacher_min_budget: int = 256
    max_steps: int = 4096

    @classmethod
    def from_config(cls, policy: Policy, rules: Mapping[str, Rule], cfg: Mapping[str, Any]) -> EngineSpec:
        """The spec of a resolved synthesis section: every field of this class that the section names."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("policy",) and f.name not in rules]
        return cls(policy=policy, **rules, **{name: cfg[name] for name in names})

    @property
    def uses_teacher(self) -> bool:
        return self.policy.needs_teacher

    @property
    def out_cap(self) -> int:
        """Record tokens a slot can hold: the trajectory, the teacher's continuation, one chunk of slack."""
        teacher = max(self.teacher_min_budget, self.traj_cap) if self.uses_teacher else 0
        return self.traj_cap + teacher + self.draft_len + 1

    @property
    def tokens_per_iteration(self) -> int:
        """The most positions one iteration can add to a slot's context (k drafts + a residual / bonus)."""
        return self.draft_len + 1


def topk_entropy(logits: jax.Array, k: int) -> jax.Array:
    """Entropy of the distribution restricted to its top-k tokens and renormalised (spec eq. 6)."""
    top = jax.lax.top_k(logits.astype(jnp.float32), k)[0]
    logp = jax.nn.log_softmax(top, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b]] for x [B, N, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 1)), axis=1)[:, 0]


def _draft(spec: EngineSpec, student, s: EngineState, base_keys: jax.Array):
    """k student tokens per slot. Returns (cache, drafts [B,k], student log-probs [B,k], q [B,k,V] | None)."""
    b, k = s.num_slots, spec.draft_len
    teacher_mode = s.mode == TEACHER
    live = s.live
    lag = s.student_lag
    # Rows whose student cache lacks the token before `pending` (after a bonus token) feed two tokens.
    first = jnp.where(lag[:, None], jnp.stack([s.previous, s.pending], 1), jnp.stack([s.pending, s.pending], 1))
    cache = s.student_cache.with_lengths(jnp.where(live, s.ctx_len - 1 - lag, 0))
    stochastic_draft = not isinstance(spec.draft_rule, Greedy)

    def pick(i, logits):
        if spec.policy.keys_by_position:
            keys = jax.vmap(jax.random.fold_in)(s.keys, s.out_len + i)
        else:
            keys = jax.vmap(lambda key: jax.random.fold_in(key, i))(base_keys)
        token = jnp.where(teacher_mode, spec.draft_rule.select(logits, keys), spec.student_rule.select(logits, keys))
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        return token, logp

    logits, cache = student.extend(first, cache, jnp.where(live, 1 + lag.astype(jnp.int32), 0), logits="last")
    drafts = jnp.zeros((b, k), jnp.int32)
    logps = jnp.zeros((b, k), jnp.float32)
    q = jnp.zeros((b, k, logits.shape[-1]), jnp.float32) if stochastic_draft else None
    one = live.astype(jnp.int32)

    def body(i, carry):
        cache, logits, drafts, logps, q = carry
        token, logp = pick(i, logits)
        drafts, logps = drafts.at[:, i].set(token), logps.at[:, i].set(logp)
        if q is not None:
            q = q.at[:, i].set(spec.draft_rule.distribution(logits))
        logits, cache = jax.lax.cond(i + 1 < k, lambda c: student.extend(token[:, None], c, one, logits="last"),
                                     lambda c: (logits, c), cache)
        return cache, logits, drafts, logps, q

    cache, _, drafts, logps, q = jax.lax.fori_loop(0, k, body, (cache, logits, drafts, logps, q))
    return cache, drafts, logps, q


def _candidates(spec: EngineSpec, s: EngineState, drafts, q, teacher_logits, base_keys):
    """The committed-token candidates of the chunk [B, k+1] with validity, provenance and teacher stats."""
    b, k = drafts.shape
    teacher_mode = s.mode == TEACHER
    position_keys = jax.vmap(lambda key: jax.vmap(lambda p: jax.random.fold_in(key, 1000 + p))(jnp.arange(k + 1)))(
        base_keys)  # [B, k+1]
    teacher_samples = jax.vmap(spec.teacher_rule.select, in_axes=(1, 1), out_axes=1)(teacher_logits, position_keys)
    uniforms = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 2000), (k,)))(base_keys)
    residual_keys = jax.vmap(lambda key: jax.random.fold_in(key, 3000))(base_keys)
    accepted, teacher_token = accept_drafts(drafts, spec.teacher_rule.distribution(teacher_logits[:, :k]), q,
                                            uniforms, residual_keys, teacher_samples[:, k])
    # Token-level SKD: the first draft outside the teacher's top-K is replaced by a teacher sample.
    if spec.policy.token_top_k:
        draft_logit = jnp.take_along_axis(teacher_logits[:, :k], drafts[..., None], axis=-1)
        in_top = jnp.sum(teacher_logits[:, :k] > draft_logit, axis=-1) < spec.policy.token_top_k
        cut_explore = jnp.sum(jnp.cumprod(in_top, axis=1), axis=1).astype(jnp.int32)
    else:
        cut_explore = jnp.full((b,), k, jnp.int32)
    cut = jnp.where(teacher_mode, accepted, cut_explore)
    replaced = teacher_mode | (cut_explore < k)
    replacement = jnp.where(teacher_mode, teacher_token, _gather(teacher_samples, cut_explore))
    position = jnp.arange(k + 1)[None, :]
    tokens = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
    tokens = jnp.where(replaced[:, None] & (position == cut[:, None]), replacement[:, None], tokens)
    valid = position < (cut + replaced)[:, None]
    source = jnp.where(teacher_mode[:, None] | (position == cut[:, None]), SRC_TEACHER, SRC_STUDENT)
    teacher_logp = jnp.take_along_axis(jax.nn.log_softmax(teacher_logits), tokens[..., None], axis=-1)[..., 0]
    entropy = topk_entropy(teacher_logits, spec.entropy_top_k)
    return tokens, valid, source, teacher_logp, entropy, accepted


def iteration(spec: EngineSpec, student, teacher, tables: EngineTables, s: EngineState) -> EngineState:
    """One draft-verify-apply iteration of every slot."""
    k = spec.draft_len
    live = s.live
    teacher_mode = live & (s.mode == TEACHER)
    base_keys = jax.vmap(jax.random.fold_in)(s.keys, s.iteration)
    student_cache, drafts, student_logp, q = _draft(spec, student, s, base_keys)
    teacher_cache = s.teacher_cache
    b = s.num_slots
    if spec.uses_teacher:
        teacher_cache = teacher_cache.with_lengths(jnp.where(live, s.ctx_len - 1, 0))
        chunk = jnp.concatenate([s.pending[:, None], drafts], axis=1)
        teacher_logits, teacher_cache = teacher.extend(chunk, teacher_cache, jnp.where(live, k + 1, 0), logits="all")
        tokens, valid, source, teacher_logp, entropy, accepted = _candidates(spec, s, drafts, q, teacher_logits,
                                                                             base_keys)
    else:
        tokens = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
        valid = jnp.arange(k + 1)[None, :] < k
        source = jnp.full((b, k + 1), SRC_STUDENT, jnp.int32)
        teacher_logp = entropy = jnp.zeros((b, k + 1), jnp.float32)
        accepted = jnp.zeros((b,), jnp.int32)
    student_logp = jnp.concatenate([student_logp, jnp.zeros((b, 1), jnp.float32)], axis=1)
    slots = apply_tokens(spec, tables, s, tokens, valid, source, teacher_logp, student_logp, entropy)
    lag = live & (slots.ctx_len == s.ctx_len + k + 1)
    return dataclasses.replace(
        slots, student_cache=student_cache, teacher_cache=teacher_cache, iteration=s.iteration + live,
        student_lag=lag, previous=jnp.where(lag, drafts[:, k - 1], slots.previous),
        teacher_forwards=s.teacher_forwards + (live & spec.uses_teacher),
        drafted=s.drafted + jnp.where(teacher_mode, k, 0),
        accepted_drafts=s.accepted_drafts + jnp.where(teacher_mode, accepted, 0))


def state_specs(s: EngineState) -> EngineState:
    """How `s` splits over engine groups (`data`): every per-slot array on its slot axis, each page pool on its
    pool axis (one contiguous pool per group, addressed by group-local page ids)."""
    def cache(c: PagedKVCache) -> PagedKVCache:
        pool = P(None, "data") if c.layout == "head_major" else P("data")
        return dataclasses.replace(c, k_pages=pool, v_pages=None if c.v_pages is None else pool,
                                   page_table=P("data"), lengths=P("data"), dropped=P("data"))

    slots = {name: P("data") for name in SLOT_FIELDS}
    return dataclasses.replace(s, student_cache=cache(s.student_cache), teacher_cache=cache(s.teacher_cache), **slots)


def over_groups(fn: Callable, groups: Mesh | None, in_specs: tuple, out_specs: Any) -> Callable:
    """`fn` per engine group: under `shard_map` over the mesh's `data` axis when `groups` is a mesh (each group
    sees its own slots and pools; the model axes stay automatic), else `fn` itself."""
    if groups is None:
        return fn
    # Size-1 axes are manual too: with every axis manual a Pallas kernel runs per device as on one device.
    manual = {"data"} | {a for a in groups.axis_names if groups.shape[a] == 1}
    return jax.shard_map(fn, mesh=groups, in_specs=in_specs, out_specs=out_specs, axis_names=manual,
                         check_vma=False)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 9), donate_argnums=(6,))
def run_iterations(spec: EngineSpec, student_def: Any, teacher_def: Any, student_params: Any, teacher_params: Any,
                   tables: EngineTables, s: EngineState, max_iterations: jax.Array, stop_on_finish: jax.Array,
                   groups: Mesh | None = None) -> tuple[EngineState, jax.Array]:
    """Iterate until no slot is live, `max_iterations` ran, or (with `stop_on_finish`, when the host has work to
    put in a freed slot) a slot finishes; with `groups` (a mesh whose `data` axis splits the slots), every group
    iterates until that holds over all groups. Returns (state, iterations)."""
    axis = None if groups is None else "data"

    def loop(student_params, teacher_params, tables, s, max_iterations, stop_on_finish):
        student, teacher = nnx.merge(student_def, student_params), nnx.merge(teacher_def, teacher_params)
        over_all = (lambda x: x) if axis is None else (lambda x: jax.lax.pmax(x, axis))

        def cond(carry):
            i, st = carry
            finished = stop_on_finish & over_all(jnp.any(st.finished))
            return (i < max_iterations) & over_all(jnp.any(st.live)) & ~finished

        def body(carry):
            i, st = carry
            return i + 1, iteration(spec, student, teacher, tables, st)

        count, s = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), s))
        return s, count[None]

    specs = state_specs(s)
    loop = over_groups(loop, groups, (P(), P(), P(), specs, P(), P()), (specs, P("data")))
    s, count = loop(student_params, teacher_params, tables, s, max_iterations, stop_on_finish)
    return s, count.max()


@jax.jit
def read_rows(s: EngineState, slots: jax.Array) -> dict[str, jax.Array]:
    """The rows of `slots` [n] of every array a finished slot's record is built from (one transfer's worth)."""
    return {name: getattr(s, name)[slots] for name in RECORD_FIELDS}


@functools.partial(jax.jit, donate_argnums=(0,))
def release_slots(s: EngineState, release: jax.Array) -> EngineState:
    """Free the slots in `release` [B] bool (finished and read, or preempted): they stop running."""
    return dataclasses.replace(s, active=s.active & ~release)


def _prefill_slots(model, cache: PagedKVCache, slots: jax.Array, prompts: jax.Array,
                   num_valid: jax.Array) -> PagedKVCache:
    """Write the keys/values of prompts [n, T] (num_valid [n] tokens each) into the pages of `slots` [n] (entries
    >= B are padding): a cache-free causal pass over the new rows only; the other slots are not touched."""
    b = cache.batch_size
    in_range = slots < b
    rows = dataclasses.replace(
        cache, page_table=jnp.where(in_range[:, None], cache.page_table[jnp.minimum(slots, b - 1)], 0),
        lengths=jnp.zeros_like(slots), dropped=jnp.zeros_like(slots))
    _, rows = model.extend(prompts, rows, jnp.where(in_range, num_valid, 0), logits="none", fresh=True)
    return dataclasses.replace(cache, k_pages=rows.k_pages, v_pages=rows.v_pages,
                               dropped=cache.dropped.at[slots].add(rows.dropped, mode="drop"))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 10), donate_argnums=(5,))
def start_slots(spec: EngineSpec, student_def: Any, teacher_def: Any, student_params: Any, teacher_params: Any,
                s: EngineState, slots: jax.Array, prompts: jax.Array, prompt_lens: jax.Array,
                keys: jax.Array, groups: Mesh | None = None) -> EngineState:
    """Start trajectories in `slots` [n] (entries >= B are padding): prefill both caches with prompt[:-1] of
    prompts [n, T] (the last prompt token becomes `pending`) and set every per-slot field to its start value.
    Only these n rows are computed; their pages must already be in the caches' page tables. With `groups`, the
    n rows are split evenly over the groups and each group's `slots` are local to it."""

    def start(student_params, teacher_params, s, slots, prompts, prompt_lens, keys):
        student, teacher = nnx.merge(student_def, student_params), nnx.merge(teacher_def, teacher_params)
        n = slots.shape[0]
        last = prompts[jnp.arange(n), jnp.maximum(prompt_lens - 1, 0)]
        num_valid = prompt_lens - 1
        student_cache = _prefill_slots(student, s.student_cache, slots, prompts, num_valid)
        teacher_cache = s.teacher_cache
        if spec.uses_teacher:
            teacher_cache = _prefill_slots(teacher, teacher_cache, slots, prompts, num_valid)
        start_mode = TEACHER if spec.policy.starts_with_teacher else EXPLORE
        s = set_slots(s, slots, start_values(spec.traj_cap, start_mode, prompt_lens, last, keys))
        return dataclasses.replace(s, student_cache=student_cache, teacher_cache=teacher_cache)

    specs = state_specs(s)
    rows = P("data")
    start = over_groups(start, groups, (P(), P(), specs, rows, rows, rows, rows), specs)
    return start(student_params, teacher_params, s, slots, prompts, prompt_lens, keys)
