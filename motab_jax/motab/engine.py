"""One jitted draft-verify iteration for every slot, and the device loop around it.

Per iteration (all slots at once, whatever their mode):
1. the student drafts k tokens from each slot's context (EXPLORE: its real samples; TEACHER: drafts for
   speculative decoding);
2. the teacher runs ONE forward over [pending, d_1..d_k], giving for each drafted token its teacher
   log-probability and the top-k entropy of every state, plus the teacher's own samples;
3. each slot turns the chunk into committed tokens: EXPLORE keeps the drafts (token-level SKD may
   replace one), TEACHER keeps the prefix accepted by rejection sampling plus a residual or bonus token;
4. a scan over the committed tokens applies the policy: step boundaries (delimiter automaton, EOS, caps),
   V_T and eps at each step end, breach -> root cause t* -> rewind the context, teacher budgets, finishing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from motab_jax.models.kv_cache import KVCache
from motab_jax.motab.policies import Policy
from motab_jax.motab.state import (
    DONE,
    EXPLORE,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_TEACHER_BUDGET,
    SRC_STUDENT,
    SRC_TEACHER,
    TEACHER,
    EngineState,
)
from motab_jax.sampling.rules import Greedy, Rule


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EngineTables:
    """Device arrays the loop reads (not static: they depend on the tokenizer)."""

    next_state: jax.Array  # [num_states, V] int32: delimiter automaton
    completes: jax.Array  # [num_states, V] bool
    eos: jax.Array  # [num_eos] int32


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
    max_steps: int = 512

    @property
    def out_cap(self) -> int:
        return self.traj_cap + max(self.teacher_min_budget, self.traj_cap) + self.draft_len + 1


def topk_entropy(logits: jax.Array, k: int) -> jax.Array:
    """Entropy of the distribution restricted to its top-k tokens and renormalised (spec eq. 6)."""
    top = jax.lax.top_k(logits.astype(jnp.float32), k)[0]
    logp = jax.nn.log_softmax(top, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def root_cause(values: jax.Array, t: jax.Array) -> jax.Array:
    """t* (1-based): the step k in 2..t with the most negative V_k - V_{k-1}; 1 when t = 1."""
    index = jnp.arange(values.shape[1])
    delta = values - jnp.roll(values, 1, axis=1)
    usable = (index >= 1)[None, :] & (index[None, :] < t[:, None])
    first_min = jnp.argmin(jnp.where(usable, delta, jnp.inf), axis=1).astype(jnp.int32)
    return jnp.where(t <= 1, 1, first_min + 1)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[b, index[b]] for x [B, N, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 1)), axis=1)[:, 0]


def _draft(spec: EngineSpec, student, s: EngineState, base_keys: jax.Array, lag: jax.Array,
           previous: jax.Array):
    """k student tokens per slot. Returns (cache, drafts [B,k], student log-probs [B,k], q [B,k,V] | None)."""
    b, k = s.num_slots, spec.draft_len
    teacher_mode = s.mode == TEACHER
    live = s.active & (s.mode != DONE)
    # Rows whose student cache lacks the token before `pending` (after a bonus token) feed two tokens.
    first = jnp.where(lag[:, None], jnp.stack([previous, s.pending], 1), jnp.stack([s.pending, s.pending], 1))
    cache = s.student_cache.with_lengths(jnp.where(live, s.ctx_len - 1 - lag, 0))
    stochastic_draft = not isinstance(spec.draft_rule, Greedy)

    def pick(i, logits):
        keys = jax.vmap(lambda key: jax.random.fold_in(key, i))(base_keys)
        token = jnp.where(teacher_mode, spec.draft_rule.select(logits, keys), spec.student_rule.select(logits, keys))
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        return token, logp

    logits, cache = student.extend(first, cache, 1 + lag.astype(jnp.int32), logits="last")
    drafts = jnp.zeros((b, k), jnp.int32)
    logps = jnp.zeros((b, k), jnp.float32)
    q = jnp.zeros((b, k, logits.shape[-1]), jnp.float32) if stochastic_draft else None

    def body(i, carry):
        cache, logits, drafts, logps, q = carry
        token, logp = pick(i, logits)
        drafts, logps = drafts.at[:, i].set(token), logps.at[:, i].set(logp)
        if q is not None:
            q = q.at[:, i].set(spec.draft_rule.distribution(logits))
        logits, cache = jax.lax.cond(i + 1 < k, lambda c: student.extend(token[:, None], c, logits="last"),
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
    # Speculative decoding: accept d_i with probability min(1, p(d_i) / q(d_i)).
    p_dist = spec.teacher_rule.distribution(teacher_logits[:, :k])  # [B, k, V]
    p_drafts = jnp.take_along_axis(p_dist, drafts[..., None], axis=-1)[..., 0]
    q_drafts = jnp.ones_like(p_drafts) if q is None else jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    uniforms = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 2000), (k,)))(base_keys)
    accepted = jnp.sum(jnp.cumprod(uniforms * q_drafts <= p_drafts, axis=1), axis=1).astype(jnp.int32)
    at = jnp.minimum(accepted, k - 1)
    p_at = _gather(p_dist, at)
    q_at = jax.nn.one_hot(_gather(drafts, at), p_at.shape[-1]) if q is None else _gather(q, at)
    residual = jnp.maximum(p_at - q_at, 0.0)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_at)
    residual_keys = jax.vmap(lambda key: jax.random.fold_in(key, 3000))(base_keys)
    resampled = jax.vmap(lambda key, r: jax.random.categorical(key, jnp.log(r)))(residual_keys, residual)
    teacher_token = jnp.where(accepted < k, resampled, teacher_samples[:, k]).astype(jnp.int32)
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


def _apply_tokens(spec: EngineSpec, tables: EngineTables, s: EngineState, tokens, valid, source, teacher_logp,
                  student_logp, entropy) -> EngineState:
    """Scan the chunk's candidates in order, applying step logic and the policy, per slot."""
    policy = spec.policy
    b = s.num_slots
    rows = jnp.arange(b)
    out_cap, max_steps = s.out_tokens.shape[1], s.step_start.shape[1]

    def step(carry, x):
        st, stop = carry
        token, is_valid, src, lt, ls, h = x
        go = is_valid & ~stop & s.active & (st.mode != DONE)
        explore, teach = go & (st.mode == EXPLORE), go & (st.mode == TEACHER)
        pos = st.out_len
        out_tokens = st.out_tokens.at[rows, jnp.where(go, pos, out_cap)].set(token, mode="drop")
        out_src = st.out_src.at[rows, jnp.where(go, pos, out_cap)].set(src, mode="drop")
        out_len = pos + go
        ctx_len = st.ctx_len + go
        pending = jnp.where(go, token, st.pending)
        is_eos = jnp.any(token[:, None] == tables.eos[None, :], axis=-1)
        completes = tables.completes[st.automaton, token]
        automaton = jnp.where(go, tables.next_state[st.automaton, token], st.automaton)
        first = go & (st.step_count == 0)
        step_entropy = jnp.where(first & explore, h, st.step_entropy)
        step_start = st.step_start.at[rows, jnp.where(first, st.num_steps, max_steps)].set(pos, mode="drop")
        sum_t = st.step_sum_teacher + jnp.where(explore, lt, 0.0)
        sum_s = st.step_sum_student + jnp.where(explore, ls, 0.0)
        step_count = st.step_count + go
        generated = ctx_len - st.prompt_len
        capped = step_count >= spec.step_cap
        # --- a student step ends: judge it
        step_end = explore & (completes | is_eos | capped | (generated >= spec.traj_cap))
        n = jnp.maximum(step_count, 1).astype(jnp.float32)
        v_teacher, v_student = jnp.exp(sum_t / n), jnp.exp(sum_s / n)
        eps = policy.boundary(step_entropy)
        accept = policy.judge(v_teacher, v_student, eps) if policy.needs_teacher else jnp.ones_like(step_end)
        write = jnp.where(step_end, st.num_steps, max_steps)
        step_value = st.step_value.at[rows, write].set(v_teacher if policy.needs_teacher else jnp.nan, mode="drop")
        step_eps = st.step_eps.at[rows, write].set(eps, mode="drop")
        step_h = st.step_h.at[rows, write].set(step_entropy, mode="drop")
        num_steps = st.num_steps + step_end
        breach = step_end & ~accept
        kept = step_end & accept
        # --- breach: rewind the context to the start of step t* and hand over to the teacher
        t_star = root_cause(step_value, num_steps) if policy.backtrack else num_steps
        safe = jnp.take_along_axis(step_start, jnp.maximum(t_star - 1, 0)[:, None], axis=1)[:, 0]
        safe_pending = jnp.where(safe > 0, out_tokens[rows, jnp.maximum(safe - 1, 0)], s.prompt_last)
        first_breach = breach & (st.breach_step == 0)
        record_len = jnp.where(breach & ~policy.stitch, safe, out_len)
        budget = jnp.maximum(spec.teacher_min_budget, spec.traj_cap - safe)
        # --- a teacher token: budgets, EOS, and (one-step policies) the end of the teacher's step
        teacher_budget = jnp.where(breach, budget, st.teacher_budget - teach)
        teacher_done = teach & (is_eos | (teacher_budget <= 0))
        teacher_step_end = teach & (completes | is_eos | capped) & ~teacher_done
        hand_back = teacher_step_end if policy.teacher_writes == "one_step" else jnp.zeros_like(teach)
        num_steps = num_steps + hand_back
        step_value = step_value.at[rows, jnp.where(hand_back, st.num_steps, max_steps)].set(jnp.nan, mode="drop")
        finished = (kept & (is_eos | (generated >= spec.traj_cap))) | teacher_done
        finish = jnp.where(kept & is_eos, FINISH_EOS, st.finish)
        finish = jnp.where(kept & ~is_eos & (generated >= spec.traj_cap), FINISH_LENGTH, finish)
        finish = jnp.where(teacher_done, jnp.where(is_eos, FINISH_EOS, FINISH_TEACHER_BUDGET), finish)
        mode = jnp.where(breach, TEACHER, jnp.where(hand_back, EXPLORE, st.mode))
        mode = jnp.where(finished, DONE, mode)
        reset = step_end | hand_back
        new = dataclasses.replace(
            st, mode=mode, finish=finish, ctx_len=jnp.where(breach, st.prompt_len + safe, ctx_len),
            pending=jnp.where(breach, safe_pending, pending), out_tokens=out_tokens, out_src=out_src,
            out_len=record_len, explore_len=jnp.where(breach, record_len, st.explore_len),
            step_sum_teacher=jnp.where(reset, 0.0, sum_t), step_sum_student=jnp.where(reset, 0.0, sum_s),
            step_count=jnp.where(reset | breach, 0, step_count), step_entropy=step_entropy,
            automaton=jnp.where(reset | breach, 0, automaton), num_steps=num_steps, step_start=step_start,
            step_value=step_value, step_eps=step_eps, step_h=step_h,
            breach_step=jnp.where(first_breach, num_steps, st.breach_step),
            root_step=jnp.where(first_breach, t_star, st.root_step),
            safe_len=jnp.where(first_breach, safe, st.safe_len), teacher_budget=teacher_budget,
            interventions=st.interventions + breach + (explore & (src == SRC_TEACHER)))
        return (new, stop | breach | hand_back), None

    slots = dataclasses.replace(s, student_cache=None, teacher_cache=None)
    xs = tuple(a.T for a in (tokens, valid, source, teacher_logp, student_logp, entropy))
    (slots, _), _ = jax.lax.scan(step, (slots, jnp.zeros((b,), bool)), xs)
    return slots


def iteration(spec: EngineSpec, student, teacher, tables: EngineTables, s: EngineState) -> EngineState:
    """One draft-verify-apply iteration of every slot."""
    k = spec.draft_len
    live = s.active & (s.mode != DONE)
    teacher_mode = live & (s.mode == TEACHER)
    base_keys = jax.vmap(jax.random.fold_in)(s.keys, s.iteration)
    student_cache, drafts, student_logp, q = _draft(spec, student, s, base_keys, s.student_lag, s.previous)
    teacher_cache = s.teacher_cache
    b = s.num_slots
    if spec.policy.needs_teacher:
        teacher_cache = teacher_cache.with_lengths(jnp.where(live, s.ctx_len - 1, 0))
        chunk = jnp.concatenate([s.pending[:, None], drafts], axis=1)
        teacher_logits, teacher_cache = teacher.extend(chunk, teacher_cache, logits="all")
        tokens, valid, source, teacher_logp, entropy, accepted = _candidates(spec, s, drafts, q, teacher_logits,
                                                                             base_keys)
    else:
        tokens = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
        valid = jnp.arange(k + 1)[None, :] < k
        source = jnp.full((b, k + 1), SRC_STUDENT, jnp.int32)
        teacher_logp = entropy = jnp.zeros((b, k + 1), jnp.float32)
        accepted = jnp.zeros((b,), jnp.int32)
    student_logp = jnp.concatenate([student_logp, jnp.zeros((b, 1), jnp.float32)], axis=1)
    slots = _apply_tokens(spec, tables, s, tokens, valid, source, teacher_logp, student_logp, entropy)
    lag = live & (slots.ctx_len == s.ctx_len + k + 1)
    return dataclasses.replace(
        slots, student_cache=student_cache, teacher_cache=teacher_cache, iteration=s.iteration + live,
        student_lag=lag, previous=jnp.where(lag, drafts[:, k - 1], slots.previous),
        teacher_forwards=s.teacher_forwards + (live & spec.policy.needs_teacher),
        drafted=s.drafted + jnp.where(teacher_mode, k, 0),
        accepted_drafts=s.accepted_drafts + jnp.where(teacher_mode, accepted, 0))


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(6,))
def run_iterations(spec: EngineSpec, student_def: Any, teacher_def: Any, student_params: Any, teacher_params: Any,
                   tables: EngineTables, s: EngineState, max_iterations: jax.Array) -> tuple[EngineState, jax.Array]:
    """Iterate until a slot finishes, no slot is live, or `max_iterations` ran. Returns (state, iterations)."""
    student, teacher = nnx.merge(student_def, student_params), nnx.merge(teacher_def, teacher_params)

    def cond(carry):
        i, st = carry
        live = st.active & (st.mode != DONE)
        return (i < max_iterations) & jnp.any(live) & ~jnp.any(st.active & (st.mode == DONE))

    def body(carry):
        i, st = carry
        return i + 1, iteration(spec, student, teacher, tables, st)

    count, s = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), s))
    return s, count


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(5,))
def refill(spec: EngineSpec, student_def: Any, teacher_def: Any, student_params: Any, teacher_params: Any,
           s: EngineState, release_mask: jax.Array, mask: jax.Array, prompts: jax.Array, prompt_lens: jax.Array,
           keys: jax.Array) -> EngineState:
    """Free the slots in `release_mask` (their records were read), then start new trajectories in the slots
    where `mask` [B] is set: reset their state and prefill both caches with prompt[:-1] (the last prompt
    token becomes `pending`). prompts [B, T], prompt_lens [B], keys [B] PRNG keys."""
    s = dataclasses.replace(s, active=s.active & ~release_mask)
    student, teacher = nnx.merge(student_def, student_params), nnx.merge(teacher_def, teacher_params)
    b = s.num_slots
    rows = jnp.arange(b)
    last = prompts[rows, jnp.maximum(prompt_lens - 1, 0)]
    num_valid = jnp.where(mask, prompt_lens - 1, 0)

    def prefill(model, cache: KVCache) -> KVCache:
        cache = cache.with_lengths(jnp.where(mask, 0, cache.lengths))
        return model.extend(prompts, cache, num_valid, logits="none")[1]

    student_cache = prefill(student, s.student_cache)
    teacher_cache = prefill(teacher, s.teacher_cache) if spec.policy.needs_teacher else s.teacher_cache

    def reset(old: jax.Array, value) -> jax.Array:
        value = jnp.broadcast_to(jnp.asarray(value, old.dtype), old.shape)
        return jnp.where(mask.reshape((b,) + (1,) * (old.ndim - 1)), value, old)

    zero_fields = ["iteration", "finish", "out_len", "explore_len", "step_sum_teacher", "step_sum_student",
                   "step_count", "step_entropy", "automaton", "num_steps", "step_start", "step_value", "step_eps",
                   "step_h", "breach_step", "root_step", "safe_len", "interventions", "drafted", "accepted_drafts",
                   "teacher_forwards", "student_lag", "previous"]
    start_mode = TEACHER if spec.policy.starts_with_teacher else EXPLORE
    return dataclasses.replace(
        s, student_cache=student_cache, teacher_cache=teacher_cache,
        **{f: reset(getattr(s, f), 0) for f in zero_fields},
        keys=jax.random.wrap_key_data(jnp.where(mask[:, None], jax.random.key_data(keys), jax.random.key_data(s.keys))),
        active=s.active | mask, mode=reset(s.mode, start_mode), prompt_len=reset(s.prompt_len, prompt_lens),
        prompt_last=reset(s.prompt_last, last), ctx_len=reset(s.ctx_len, prompt_lens), pending=reset(s.pending, last),
        teacher_budget=reset(s.teacher_budget, spec.traj_cap))

