"""The engine's loop carry: both paged KV caches plus every per-slot array, in one typed pytree.

Conventions. A slot's *context* (what both caches represent) is prompt + committed tokens; `ctx_len`
counts it and `pending` is its last token, which is not yet in either cache: every iteration rewinds both
caches to `ctx_len - 1` and feeds `pending` first, so rewinding after a breach or a rejected draft is only
a change of `ctx_len` and `pending`. The *record* is kept separately in `out_tokens` (MOTAB keeps the
flawed student steps there while the context is rewound to the safe state).

Every field other than the two caches is per slot (leading axis = slot). Starting a trajectory in a slot
sets each such field to its start value: zero unless `start_values` says otherwise, so a new field needs
no change to the refill code.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from motab_jax.models.paged_cache import PagedKVCache

EXPLORE, TEACHER, DONE = 0, 1, 2
SRC_STUDENT, SRC_TEACHER = 0, 1
FINISH_NONE, FINISH_EOS, FINISH_LENGTH, FINISH_TEACHER_BUDGET, FINISH_MAX_STEPS = 0, 1, 2, 3, 4
FINISH_NAMES = {FINISH_NONE: "running", FINISH_EOS: "eos", FINISH_LENGTH: "length",
                FINISH_TEACHER_BUDGET: "teacher_budget", FINISH_MAX_STEPS: "max_steps"}
CACHE_FIELDS = ("student_cache", "teacher_cache")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EngineState:
    student_cache: PagedKVCache
    teacher_cache: PagedKVCache
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
    out_logp: jax.Array  # [B, out_cap] float32: the student's log-probability (temperature 1) of each token
    out_len: jax.Array  # [B] int32
    explore_len: jax.Array  # [B] int32: record tokens written by exploration before the teacher took over
    # The current student step.
    step_sum_teacher: jax.Array  # [B] float32: sum of teacher log-probs of the step's tokens
    step_sum_student: jax.Array  # [B] float32: same under the student (SKD)
    step_count: jax.Array  # [B] int32
    step_entropy: jax.Array  # [B] float32: teacher top-k entropy at the state before the step
    automaton: jax.Array  # [B] int32: delimiter automaton state
    # Finished steps (judged or teacher-written), 0-based step index; a trajectory whose history is full
    # ends with FINISH_MAX_STEPS, so no step is ever left out of the record.
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

    @property
    def live(self) -> jax.Array:
        """[B] bool: slots holding a trajectory that is still running."""
        return self.active & (self.mode != DONE)

    @property
    def finished(self) -> jax.Array:
        """[B] bool: slots whose trajectory ended and whose record has not been read yet."""
        return self.active & (self.mode == DONE)


SLOT_FIELDS = tuple(f.name for f in dataclasses.fields(EngineState) if f.name not in CACHE_FIELDS)
# What the host reads of a finished slot (records and generation results).
RECORD_FIELDS = ("prompt_len", "out_tokens", "out_src", "out_logp", "out_len", "explore_len", "num_steps", "step_start",
                 "step_value", "step_eps", "step_h", "breach_step", "root_step", "safe_len", "interventions", "finish",
                 "drafted", "accepted_drafts", "teacher_forwards")


def empty_state(num_slots: int, out_cap: int, max_steps: int, student_cache: PagedKVCache,
                teacher_cache: PagedKVCache) -> EngineState:
    """Every slot free (inactive, DONE)."""
    b = num_slots
    widths = {"out_tokens": out_cap, "out_src": out_cap, "out_logp": out_cap, "step_start": max_steps,
              "step_value": max_steps, "step_eps": max_steps, "step_h": max_steps}
    floats = {"out_logp", "step_sum_teacher", "step_sum_student", "step_entropy", "step_value", "step_eps", "step_h"}
    bools = {"active", "student_lag"}

    def zeros(name: str) -> jax.Array:
        # Fresh buffers per field: the state is donated, and one buffer may not be donated twice.
        shape = (b, widths[name]) if name in widths else (b,)
        return jnp.zeros(shape, jnp.float32 if name in floats else bool if name in bools else jnp.int32)

    fields = {name: zeros(name) for name in SLOT_FIELDS if name != "keys"}
    fields["mode"] = jnp.full((b,), DONE, jnp.int32)
    return EngineState(student_cache=student_cache, teacher_cache=teacher_cache,
                       keys=jax.random.split(jax.random.key(0), b), **fields)


def start_values(spec_traj_cap: int, start_mode: int, prompt_lens: jax.Array, prompt_last: jax.Array,
                 keys: jax.Array) -> dict[str, jax.Array]:
    """The per-slot fields that do not start at zero, for n slots being started (each [n])."""
    n = prompt_lens.shape[0]
    return {"keys": keys, "active": jnp.ones((n,), bool), "mode": jnp.full((n,), start_mode, jnp.int32),
            "prompt_len": prompt_lens, "prompt_last": prompt_last, "ctx_len": prompt_lens, "pending": prompt_last,
            "teacher_budget": jnp.full((n,), spec_traj_cap, jnp.int32)}


def set_slots(state: EngineState, slots: jax.Array, values: dict[str, jax.Array]) -> EngineState:
    """Every per-slot field of `slots` [n] (out-of-range entries are skipped) set to `values[name]`, or to zero
    for a field `values` does not name."""
    updates = {}
    for name in SLOT_FIELDS:
        old = getattr(state, name)
        if name == "keys":
            data = jax.random.key_data(old)
            new = data.at[slots].set(jax.random.key_data(values["keys"]), mode="drop")
            updates[name] = jax.random.wrap_key_data(new)
            continue
        row = values.get(name)
        if row is None:
            row = jnp.zeros((slots.shape[0],) + old.shape[1:], old.dtype)
        updates[name] = old.at[slots].set(jnp.broadcast_to(row.astype(old.dtype), (slots.shape[0],) + old.shape[1:]),
                                          mode="drop")
    return dataclasses.replace(state, **updates)
