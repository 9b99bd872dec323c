"""The engine's loop carry: both KV caches plus every per-slot array, in one typed pytree.

Conventions. A slot's *context* (what both caches represent) is prompt + committed tokens; `ctx_len`
counts it and `pending` is its last token, which is not yet in either cache: every iteration rewinds both
caches to `ctx_len - 1` and feeds `pending` first, so rewinding after a breach or a rejected draft is only
a change of `ctx_len` and `pending`. The *record* is kept separately in `out_tokens` (MOTAB keeps the
flawed student steps there while the context is rewound to the safe state).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from motab_jax.models.kv_cache import KVCache

EXPLORE, TEACHER, DONE = 0, 1, 2
SRC_STUDENT, SRC_TEACHER = 0, 1
FINISH_NONE, FINISH_EOS, FINISH_LENGTH, FINISH_TEACHER_BUDGET = 0, 1, 2, 3
FINISH_NAMES = {FINISH_NONE: "running", FINISH_EOS: "eos", FINISH_LENGTH: "length",
                FINISH_TEACHER_BUDGET: "teacher_budget"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EngineState:
    student_cache: KVCache
    teacher_cache: KVCache
    keys: jax.Array  # [B] PRNG keys, one per trajectory (seed, trajectory id)
    iteration: jax.Array  # [B] int32: iterations this trajectory has run (keys are folded with it)
    active: jax.Array  # [B] bool: the slot holds a trajectory
    mode: jax.Array  # [B] int32: EXPLORE / TEACHER / DONE
    finish: jax.Array  # [B] int32: FINISH_* code
    prompt_len: jax.Array  # [B] int32
    prompt_last: jax.Array  # [B] int32: last prompt token (the pending token of an empty context)
    ctx_len: jax.Array  # [B] int32: prompt + committed tokens
    pending: jax.Array  # [B] int32: last context token, fed at the next iteration
    # After a bonus token the student has not seen the token before `pending` either: it feeds both.
    student_lag: jax.Array  # [B] bool
    previous: jax.Array  # [B] int32: the context token before `pending` (used when student_lag)
    out_tokens: jax.Array  # [B, out_cap] int32: the record's tokens
    out_src: jax.Array  # [B, out_cap] int32: SRC_STUDENT / SRC_TEACHER per record token
    out_len: jax.Array  # [B] int32
    explore_len: jax.Array  # [B] int32: record tokens written by exploration before the teacher took over
    # The current student step.
    step_sum_teacher: jax.Array  # [B] float32: sum of teacher log-probs of the step's tokens
    step_sum_student: jax.Array  # [B] float32: same under the student (SKD)
    step_count: jax.Array  # [B] int32
    step_entropy: jax.Array  # [B] float32: teacher top-k entropy at the state before the step
    automaton: jax.Array  # [B] int32: delimiter automaton state
    # Finished steps (judged or teacher-written), 0-based step index.
    num_steps: jax.Array  # [B] int32
    step_start: jax.Array  # [B, max_steps] int32: record offset where each step starts
    step_value: jax.Array  # [B, max_steps] float32: V_T
    step_eps: jax.Array  # [B, max_steps] float32: eps
    step_h: jax.Array  # [B, max_steps] float32: teacher top-k entropy H(s_{t-1}) that set eps
    breach_step: jax.Array  # [B] int32: 1-based t of the (first) rejected step, 0 if none
    root_step: jax.Array  # [B] int32: 1-based t*, 0 if none
    safe_len: jax.Array  # [B] int32: record tokens before step t* (the safe prefix)
    teacher_budget: jax.Array  # [B] int32: tokens the teacher may still write
    interventions: jax.Array  # [B] int32
    # Counters for statistics.
    drafted: jax.Array  # [B] int32: tokens the student drafted in teacher mode
    accepted_drafts: jax.Array  # [B] int32: of those, kept by rejection sampling
    teacher_forwards: jax.Array  # [B] int32

    @property
    def num_slots(self) -> int:
        return self.active.shape[0]


def empty_state(num_slots: int, out_cap: int, max_steps: int, student_cache: KVCache,
                teacher_cache: KVCache) -> EngineState:
    b = num_slots

    # Fresh buffers per field: the state is donated, and one buffer may not be donated twice.
    def zi():
        return jnp.zeros((b,), jnp.int32)

    def zf():
        return jnp.zeros((b,), jnp.float32)

    return EngineState(
        student_cache=student_cache, teacher_cache=teacher_cache,
        keys=jax.random.split(jax.random.key(0), b), iteration=zi(), active=jnp.zeros((b,), bool),
        mode=jnp.full((b,), DONE, jnp.int32), finish=zi(), prompt_len=zi(), prompt_last=zi(), ctx_len=zi(), pending=zi(),
        student_lag=jnp.zeros((b,), bool), previous=zi(),
        out_tokens=jnp.zeros((b, out_cap), jnp.int32), out_src=jnp.zeros((b, out_cap), jnp.int32), out_len=zi(),
        explore_len=zi(), step_sum_teacher=zf(), step_sum_student=zf(), step_count=zi(), step_entropy=zf(), automaton=zi(),
        num_steps=zi(), step_start=jnp.zeros((b, max_steps), jnp.int32),
        step_value=jnp.zeros((b, max_steps), jnp.float32), step_eps=jnp.zeros((b, max_steps), jnp.float32),
        step_h=jnp.zeros((b, max_steps), jnp.float32),
        breach_step=zi(), root_step=zi(), safe_len=zi(), teacher_budget=zi(), interventions=zi(), drafted=zi(),
        accepted_drafts=zi(), teacher_forwards=zi())
