"""The per-token transition of the engine: how one committed token changes a slot (spec section 3).

`apply_tokens` scans a chunk's candidate tokens in order; for each token and every slot at once it runs
small named steps:
1. `_commit`: append the token to the record and the context, advance the delimiter automaton and the
   current step's sums;
2. `_judge_step`: a student step that ended (delimiter, EOS, step or trajectory cap) gets V_T and eps and is
   accepted or rejected by the policy;
3. `_backtrack`: a rejected step rewinds the context to the start of the root-cause step t* (or t) and
   hands over to the teacher with its budget;
4. `_teacher_token`: a teacher token spends budget and, for one-step policies, may end the teacher's step
   and hand back to the student;
5. `_finish`: end the trajectory (EOS, length, teacher budget, a full step history) and reset the step.
A breach or a hand-back stops the slot's remaining candidates in this chunk (they were drafted from a context
that no longer holds).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from motab_jax.motab.delimiter import build_delimiter_tables
from motab_jax.motab.state import (
    DONE,
    EXPLORE,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_MAX_STEPS,
    FINISH_TEACHER_BUDGET,
    SRC_TEACHER,
    TEACHER,
    EngineState,
)

if TYPE_CHECKING:
    from motab_jax.motab.engine import EngineSpec


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EngineTables:
    """Device arrays the loop reads (not static: they depend on the tokenizer)."""

    next_state: jax.Array  # [num_states, V] int32: delimiter automaton
    completes: jax.Array  # [num_states, V] bool
    eos: jax.Array  # [num_eos] int32

    @classmethod
    def build(cls, token_bytes: Sequence[bytes], vocab: int, delimiter: str, eos: Sequence[int]) -> EngineTables:
        """The tables of a model whose logits cover `vocab` ids: `token_bytes` per id (`text.token_bytes_table`;
        ids past it have no bytes), the step `delimiter`, the stop ids `eos`."""
        table = list(token_bytes[:vocab]) + [b""] * (vocab - len(token_bytes))
        delim = build_delimiter_tables(table, delimiter)
        return cls(jnp.asarray(delim.next_state), jnp.asarray(delim.completes),
                   jnp.asarray(sorted(set(int(t) for t in eos)) or [-1], jnp.int32))


class Token(NamedTuple):
    """One candidate position of the chunk, for every slot ([B] each)."""

    id: jax.Array
    valid: jax.Array
    source: jax.Array
    teacher_logp: jax.Array
    student_logp: jax.Array
    entropy: jax.Array  # teacher top-k entropy of the state before this token


class Events(NamedTuple):
    """What the committed token means for its slot ([B] bool unless noted)."""

    go: jax.Array  # the token is committed
    explore: jax.Array  # ... by a slot in EXPLORE
    teach: jax.Array  # ... by a slot in TEACHER
    is_eos: jax.Array
    completes: jax.Array  # the delimiter ends inside this token
    capped: jax.Array  # the step reached step_cap
    traj_full: jax.Array  # the trajectory reached traj_cap


def root_cause(values: jax.Array, t: jax.Array) -> jax.Array:
    """t* (1-based): the step k in 2..t with the most negative V_k - V_{k-1}; 1 when t = 1."""
    index = jnp.arange(values.shape[1])
    delta = values - jnp.roll(values, 1, axis=1)
    usable = (index >= 1)[None, :] & (index[None, :] < t[:, None])
    first_min = jnp.argmin(jnp.where(usable, delta, jnp.inf), axis=1).astype(jnp.int32)
    return jnp.where(t <= 1, 1, first_min + 1)


def _set_rows(x: jax.Array, column: jax.Array, where: jax.Array, value: jax.Array) -> jax.Array:
    """x[b, column[b]] = value[b] where `where[b]` (other rows untouched)."""
    rows = jnp.arange(x.shape[0])
    return x.at[rows, jnp.where(where, column, x.shape[1])].set(value, mode="drop")


def _commit(spec: EngineSpec, tables: EngineTables, st: EngineState, tok: Token, go: jax.Array):
    """Append the token to the record and context; update the automaton and the current step's sums."""
    explore, teach = go & (st.mode == EXPLORE), go & (st.mode == TEACHER)
    pos = st.out_len
    first_of_step = go & (st.step_count == 0)
    step_count = st.step_count + go
    ctx_len = st.ctx_len + go
    events = Events(go, explore, teach, is_eos=jnp.any(tok.id[:, None] == tables.eos[None, :], axis=-1),
                    completes=tables.completes[st.automaton, tok.id], capped=step_count >= spec.step_cap,
                    traj_full=ctx_len - st.prompt_len >= spec.traj_cap)
    st = dataclasses.replace(
        st, out_tokens=_set_rows(st.out_tokens, pos, go, tok.id), out_src=_set_rows(st.out_src, pos, go, tok.source),
        out_logp=_set_rows(st.out_logp, pos, go, tok.student_logp), out_len=pos + go, ctx_len=ctx_len,
        pending=jnp.where(go, tok.id, st.pending),
        automaton=jnp.where(go, tables.next_state[st.automaton, tok.id], st.automaton),
        step_entropy=jnp.where(first_of_step & explore, tok.entropy, st.step_entropy),
        step_start=_set_rows(st.step_start, st.num_steps, first_of_step, pos),
        step_sum_teacher=st.step_sum_teacher + jnp.where(explore, tok.teacher_logp, 0.0),
        step_sum_student=st.step_sum_student + jnp.where(explore, tok.student_logp, 0.0), step_count=step_count)
    return st, events


def _judge_step(spec: EngineSpec, st: EngineState, ev: Events):
    """A finished student step gets V_T (geometric-mean teacher probability) and eps, and is judged.
    Returns (state, step_end, accepted)."""
    policy = spec.policy
    step_end = ev.explore & (ev.completes | ev.is_eos | ev.capped | ev.traj_full)
    n = jnp.maximum(st.step_count, 1).astype(jnp.float32)
    v_teacher, v_student = jnp.exp(st.step_sum_teacher / n), jnp.exp(st.step_sum_student / n)
    eps = policy.boundary(st.step_entropy)
    accept = policy.judge(v_teacher, v_student, eps) if policy.needs_teacher else jnp.ones_like(step_end)
    value = v_teacher if policy.needs_teacher else jnp.full_like(v_teacher, jnp.nan)
    st = dataclasses.replace(
        st, step_value=_set_rows(st.step_value, st.num_steps, step_end, value),
        step_eps=_set_rows(st.step_eps, st.num_steps, step_end, eps),
        step_h=_set_rows(st.step_h, st.num_steps, step_end, st.step_entropy), num_steps=st.num_steps + step_end)
    return st, step_end, accept


def _backtrack(spec: EngineSpec, st: EngineState, breach: jax.Array) -> EngineState:
    """Rewind a breaching slot's context to the start of step t* and hand it to the teacher (spec 6-7)."""
    policy = spec.policy
    rows = jnp.arange(st.num_slots)
    t_star = root_cause(st.step_value, st.num_steps) if policy.backtrack else st.num_steps
    safe = jnp.take_along_axis(st.step_start, jnp.maximum(t_star - 1, 0)[:, None], axis=1)[:, 0]
    safe_pending = jnp.where(safe > 0, st.out_tokens[rows, jnp.maximum(safe - 1, 0)], st.prompt_last)
    first_breach = breach & (st.breach_step == 0)
    # Stitching keeps the flawed steps in the record; otherwise the record is cut back to the safe prefix.
    record_len = jnp.where(breach & ~policy.stitch, safe, st.out_len)
    return dataclasses.replace(
        st, mode=jnp.where(breach, TEACHER, st.mode), ctx_len=jnp.where(breach, st.prompt_len + safe, st.ctx_len),
        pending=jnp.where(breach, safe_pending, st.pending), out_len=record_len,
        explore_len=jnp.where(breach, record_len, st.explore_len),
        breach_step=jnp.where(first_breach, st.num_steps, st.breach_step),
        root_step=jnp.where(first_breach, t_star, st.root_step), safe_len=jnp.where(first_breach, safe, st.safe_len),
        teacher_budget=jnp.where(breach, jnp.maximum(spec.teacher_min_budget, spec.traj_cap - safe),
                                 st.teacher_budget),
        interventions=st.interventions + breach)


def _teacher_token(spec: EngineSpec, st: EngineState, ev: Events):
    """Spend the teacher's budget; under one-step policies the end of the teacher's step hands back to the
    student. Returns (state, teacher_done, hand_back)."""
    teacher_budget = st.teacher_budget - ev.teach
    teacher_done = ev.teach & (ev.is_eos | (teacher_budget <= 0))
    teacher_step_end = ev.teach & (ev.completes | ev.is_eos | ev.capped) & ~teacher_done
    hand_back = teacher_step_end if spec.policy.teacher_writes == "one_step" else jnp.zeros_like(ev.teach)
    st = dataclasses.replace(
        st, teacher_budget=teacher_budget, mode=jnp.where(hand_back, EXPLORE, st.mode),
        step_value=_set_rows(st.step_value, st.num_steps, hand_back, jnp.full_like(st.step_sum_teacher, jnp.nan)),
        num_steps=st.num_steps + hand_back)
    return st, teacher_done, hand_back


def _finish(spec: EngineSpec, st: EngineState, ev: Events, kept, teacher_done, step_reset) -> EngineState:
    """End finished trajectories with their reason; reset the step accumulators of slots whose step ended."""
    finished = (kept & (ev.is_eos | ev.traj_full)) | teacher_done
    finish = jnp.where(kept & ev.is_eos, FINISH_EOS, st.finish)
    finish = jnp.where(kept & ~ev.is_eos & ev.traj_full, FINISH_LENGTH, finish)
    finish = jnp.where(teacher_done, jnp.where(ev.is_eos, FINISH_EOS, FINISH_TEACHER_BUDGET), finish)
    # A full step history ends the trajectory unless the teacher writes the rest without recording steps.
    recording = (st.mode == EXPLORE) | (spec.policy.teacher_writes == "one_step")
    history_full = ev.go & ~finished & recording & (st.num_steps >= spec.max_steps)
    finish = jnp.where(history_full, FINISH_MAX_STEPS, finish)
    return dataclasses.replace(
        st, finish=finish, mode=jnp.where(finished | history_full, DONE, st.mode),
        step_sum_teacher=jnp.where(step_reset, 0.0, st.step_sum_teacher),
        step_sum_student=jnp.where(step_reset, 0.0, st.step_sum_student),
        step_count=jnp.where(step_reset, 0, st.step_count), automaton=jnp.where(step_reset, 0, st.automaton))


def apply_tokens(spec: EngineSpec, tables: EngineTables, s: EngineState, tokens, valid, source, teacher_logp,
                 student_logp, entropy) -> EngineState:
    """Scan the chunk's candidates [B, k+1] in order, applying step logic and the policy, per slot."""

    def step(carry, x):
        st, stop = carry
        tok = Token(*x)
        go = tok.valid & ~stop & st.live
        st, ev = _commit(spec, tables, st, tok, go)
        st, step_end, accept = _judge_step(spec, st, ev)
        breach, kept = step_end & ~accept, step_end & accept
        st = _backtrack(spec, st, breach)
        st, teacher_done, hand_back = _teacher_token(spec, st, ev)
        st = dataclasses.replace(st, interventions=st.interventions + (ev.explore & (tok.source == SRC_TEACHER)))
        st = _finish(spec, st, ev, kept, teacher_done, step_end | hand_back)
        return (st, stop | breach | hand_back), None

    slots = dataclasses.replace(s, student_cache=None, teacher_cache=None)
    xs = tuple(a.T for a in (tokens, valid, source, teacher_logp, student_logp, entropy))
    (slots, _), _ = jax.lax.scan(step, (slots, jnp.zeros((s.num_slots,), bool)), xs)
    return slots
