"""Synthesis with a teacher whose tokenizer differs from the student's: the teacher judges the student's TEXT.

Semantics (as the authors compute it, `../shared/CROSS_TOKENIZER.md` section 1). The context is text: the prompt
rendered for the teacher plus the accepted steps. A student step's V_T is the geometric mean of the teacher's
probabilities over the teacher tokens of encode_T(context + step) past len(encode_T(context)); H is the teacher's
top-k entropy after encode_T(context). The teacher always sees the canonical encoding of the context text: its
KV cache is kept equal to `IncrementalEncoder.ids` (re-fed from the first id that changed at the seam). The
student continues from its own sampled ids; text the teacher wrote (one-step policies) is appended to the
student's context as encode_S(text).

Shape. Each model has a paged KV cache over the slots. One round: the student decodes until each exploring slot
ends a step (`cross_device.decode`); the host turns every finished step into text and teacher ids (exact
incremental encoding, incomplete UTF-8 held back); one batched teacher `feed` scores them all; the host judges in
order (the policy's own `boundary` / `judge` and `transition.root_cause`); breaching slots rewind their text to
the safe state and the teacher writes (`decode` in its vocabulary) the rest, or one step for one-step policies.
Cache and pool sizes: `cross_sizing` (the teacher's caches from the measured teacher/student token ratio; each
model's page pool sized by memory), the rule the preflight reports. Pages: `cross_pages` (admission when both pools
have pages for a prompt; every device call reserves its rows' pages first, preempting the most recently started
trajectory when a pool runs dry and rerunning it later with the same record). On a mesh whose `data` axis has G > 1
entries the slots split into G engine groups (`cross_device` runs each group's rows under `shard_map`, with its
own pools and group-local page ids; the models are tensor parallel within a group), as on the token path. On a mesh
spanning processes (one engine over several hosts, `pipeline.multihost`) every process runs this host loop, its
encoders included, on the same values: device inputs are assembled from each process's identical copy and the
outputs the host reads are gathered to every process (`driver.HostIO`); the pools are planned from the least free
memory of the hosts and checked identical before anything runs (`driver.check_same_everywhere`), and every page
decision is a function of host state. Limits of this version: the host loop waits for each phase (no exploration
past an unscored step); the teacher decodes without drafts.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from motab_jax.models.sharding import SAMPLING_RULES, data_groups
from motab_jax.models.transformer import Decoder
from motab_jax.motab.cross_device import RUNNING, STOP_BUDGET, STOP_EOS, DecodeRows, decode, feed
from motab_jax.motab.cross_pages import GroupPages, SlotBook
from motab_jax.motab.cross_records import StepRecord, build_cross_record
from motab_jax.motab.cross_sizing import TextPathPlan, TokenRatio, measure_token_ratio, plan_text_path, ratio_texts
from motab_jax.motab.driver import EngineStats, HostIO, check_same_everywhere, created_in_place, model_mesh
from motab_jax.motab.engine import EngineSpec
from motab_jax.motab.pool import GIB, device_memory, memory_over_devices, pages_for, weight_bytes
from motab_jax.motab.state import FINISH_EOS, FINISH_LENGTH, FINISH_MAX_STEPS, FINISH_TEACHER_BUDGET
from motab_jax.motab.transition import EngineTables, root_cause
from motab_jax.sampling.sampler import bucket
from motab_jax.text import special_token_mask, token_bytes_table
from motab_jax.text.harmony import decode_reply
from motab_jax.text.incremental import EncoderStats, IncrementalEncoder

log = logging.getLogger("motab_jax")

EXPLORE, TEACHER, DONE = "explore", "teacher", "done"


@dataclasses.dataclass
class CrossJob:
    index: int  # the caller's id for the result
    student_prompt: list[int]
    teacher_prompt_text: str
    key_id: int


@dataclasses.dataclass
class _Side:
    """One model's device state: parameters, paged cache, page allocators, per-slot ids the cache holds."""

    name: str  # its pool's name in the `SlotBook`
    model_def: Any
    params: Any
    cache: Any
    pages: GroupPages
    tables: EngineTables
    tokenizer: Any
    text_bytes: list[bytes]  # what each id adds to the context text (special tokens: nothing, as a detokenizer)
    held: list[list[int]]
    groups: Mesh | None  # the mesh whose `data` axis splits the slots (None: one engine group)
    io: HostIO  # host values to and from the device (on a mesh spanning processes: the same on every process)
    book: SlotBook | None = None  # reserves pages (preempting); set once both sides exist

    def reserve(self, needs: dict[int, int]) -> None:
        """Pages for `needs[slot]` positions of each slot in this model's pool (the book may preempt slots,
        these among them: callers keep only the slots still live)."""
        assert self.book is not None
        self.book.reserve(self.name, needs)

    def rewind(self, slot: int, num_tokens: int) -> None:
        """The slot's context is now `num_tokens` long (a rewind): the pages past it go back to the pool and the
        cache no longer holds the ids past it."""
        self.pages.trim(slot, num_tokens)
        self.held[slot] = self.held[slot][:num_tokens]

    @property
    def capacity(self) -> int:
        """Positions one slot's cache addresses."""
        return self.pages.pages_per_seq * self.pages.page_size

    @classmethod
    def build(cls, name: str, model: Decoder, tokenizer: Any, num_slots: int, max_len: int, page_size: int,
              num_pages: int, delimiter: str, eos: Sequence[int], paged_impl: str) -> _Side:
        """`num_pages`: pages of each engine group's pool, the null page included."""
        model_def, params = nnx.split(model)
        mesh = model_mesh(model)
        num_groups = data_groups(mesh)
        pages = GroupPages(num_groups, num_slots // num_groups, pages_for(max_len, page_size), page_size, num_pages)
        # Pools split over KV heads like the weights, and over data (one pool per group), created in place.
        cache = created_in_place(
            lambda: model.init_paged_cache(num_slots, max_len, page_size=page_size, num_pages=pages.pool_pages,
                                           impl=paged_impl),
            mesh, lambda shapes, mesh: shapes.shardings(mesh, SAMPLING_RULES))
        io = HostIO(mesh)
        vocab = model.config.output_vocab_size
        table = token_bytes_table(tokenizer)
        tables = EngineTables.build(table, vocab, delimiter, eos)
        if mesh is not None:
            tables = jax.tree.map(lambda a: io.put(np.asarray(a)), tables)
        special = special_token_mask(tokenizer).tolist()
        # Ids past the tokenizer's vocabulary (padded logits) add no text.
        text = [b"" if s else t for t, s in zip(table[:vocab], special)] + [b""] * (vocab - len(table))
        return cls(name, model_def, params, cache, pages, tables, tokenizer, text, [[] for _ in range(num_slots)],
                   mesh if num_groups > 1 else None, io)

    def feed(self, targets: dict[int, list[int]], score_from: dict[int, int], entropy_top_k: int
             ) -> dict[int, tuple[float, float]]:
        """Make each slot's cache hold `targets[slot]`; returns per slot (sum of log p of target[i] for i >=
        score_from[slot] (absolute), top-k entropy after the last target id)."""
        self.reserve({slot: len(target) for slot, target in targets.items()})
        # Preempted rows drop out (no admission happens inside a phase, so a live slot is the caller's trajectory).
        targets = {slot: target for slot, target in targets.items() if self.book.live(slot)}
        if not targets:
            return {}
        b = len(self.held)
        plans = {}
        for slot, target in targets.items():
            same = _common_prefix(self.held[slot], target)
            start = min(same, len(target) - 1)  # feed at least the last id: its logits give the entropy
            if slot in score_from:
                start = min(start, score_from[slot] - 1)
            plans[slot] = (start, target[start:])
        width = bucket(max(len(tokens) for _, tokens in plans.values()))
        tokens = np.zeros((b, width), np.int32)
        start = np.zeros(b, np.int32)
        num_valid = np.zeros(b, np.int32)
        first = np.full(b, width, np.int32)
        for slot, (s, ids) in plans.items():
            tokens[slot, :len(ids)], start[slot], num_valid[slot] = ids, s, len(ids)
            if slot in score_from:
                first[slot] = score_from[slot] - s
        self.cache = self.pages.commit(self.cache)
        rows = lambda a: self.io.put(a, P("data"))  # noqa: E731
        self.cache, sums, entropy = feed(self.model_def, self.params, self.cache, rows(tokens), rows(start),
                                         rows(num_valid), entropy_top_k, rows(first), self.groups)
        sums, entropy = self.io.get((sums, entropy))
        for slot, target in targets.items():
            self.held[slot] = list(target)
        return {slot: (float(sums[slot]), float(entropy[slot])) for slot in targets}


def _common_prefix(a: list[int], b: list[int], tail: int = 64) -> int:
    """Length of the common prefix of two id lists. Contexts change near their end (a seam, a rewind), so the
    prefix up to `tail` ids before the shorter end is compared at C speed and only the tail id by id."""
    n = min(len(a), len(b))
    i = max(n - tail, 0)
    if a[:i] != b[:i]:
        i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclasses.dataclass
class _Trajectory:
    job: CrossJob
    student_ids: list[int]  # the student's context: prompt + its own ids + encode_S(teacher-written text)
    teacher: IncrementalEncoder  # the teacher's context text and its canonical ids
    prompt_len: int
    mode: str = EXPLORE
    steps: list[StepRecord] = dataclasses.field(default_factory=list)
    step_ids: list[int] = dataclasses.field(default_factory=list)  # the current step (student or teacher ids)
    step_logp: list[float] = dataclasses.field(default_factory=list)
    step_chars: int = 0  # teacher-context characters when the current step started
    h_context: float = 0.0  # the teacher's top-k entropy after its encoding of the context
    step_stop: int = RUNNING  # why the current step's decoding stopped (RUNNING: it goes on)
    automaton: int = 0
    student_position: int = 0  # student samples drawn (key index)
    teacher_position: int = 0
    teacher_budget: int = 0
    breach_step: int = 0
    root_step: int = 0
    safe_tokens: int = 0
    interventions: int = 0
    teacher_forwards: int = 0
    finish: int = 0
    at_capacity: bool = False  # ended because a context (the teacher's, or the student's after a teacher step) filled its cache


def run_cross_engine(spec: EngineSpec, student: Decoder, teacher: Decoder, student_tokenizer: Any,
                     teacher_tokenizer: Any, jobs: Sequence[CrossJob], cfg: Mapping[str, Any], *,
                     student_eos: Sequence[int], teacher_eos: Sequence[int],
                     stats: EncoderStats | None = None, ratio_sample: tuple[str, Sequence[str]] | None = None,
                     counters: EngineStats | None = None) -> Iterator[tuple[CrossJob, dict[str, Any]]]:
    """Run every job; yields (job, record fields) as trajectories finish (see `cross_records`). `ratio_sample`:
    (where from, texts) to measure the teacher/student token ratio on (`cross_sizing.ratio_texts`; default the
    bundled MATH-500 solutions). `counters`: gets the rounds (`syncs`), trajectory starts (reruns included) and
    preemptions."""
    policy = spec.policy
    groups = data_groups(model_mesh(student))
    if data_groups(model_mesh(teacher)) != groups:
        raise ValueError(f"the student runs in {groups} engine group(s) but the teacher in "
                         f"{data_groups(model_mesh(teacher))}: place both models on one mesh")
    page = int(cfg["page_size"])
    source, texts = ratio_sample or ratio_texts(())
    ratio = measure_token_ratio(student_tokenizer, teacher_tokenizer, texts, source)
    log.info("cross-vocabulary synthesis: %s", ratio.describe())
    # num_slots over all engine groups, as on the token path: each group gets its share (rounded up).
    wanted = -(-min(int(cfg["num_slots"]), len(jobs)) // groups)
    plan = pools_plan(cfg, student, teacher, ratio, wanted=wanted, groups=groups)
    num_slots = groups * plan.slots
    mesh = model_mesh(student)
    if mesh is not None and mesh.is_multi_process:
        check_same_everywhere(
            (plan.slots, plan.student_len, plan.teacher_len, plan.student_pages, plan.teacher_pages, page, cfg["seed"],
             [(j.index, j.key_id, tuple(j.student_prompt), j.teacher_prompt_text) for j in jobs]),
            {"jobs": len(jobs), "slots per group": plan.slots, "student pages": plan.student_pages,
             "teacher pages": plan.teacher_pages},
            "set synthesis.memory_budget_gb or num_pages when the hosts' free memory differs")
    sides = {
        "student": _Side.build("student", student, student_tokenizer, num_slots, plan.student_len, page,
                               plan.student_pages, cfg["delimiter"], student_eos, cfg["paged_impl"]),
        "teacher": _Side.build("teacher", teacher, teacher_tokenizer, num_slots, plan.teacher_len, page,
                               plan.teacher_pages, cfg["delimiter"], teacher_eos, cfg["paged_impl"])}
    slots: list[_Trajectory | None] = [None] * num_slots

    def drop(slot: int) -> None:
        """The slot's trajectory leaves its slot (finished, or preempted: its rerun rebuilds it from the job)."""
        slots[slot] = None
        for side in sides.values():
            side.held[slot] = []

    book: SlotBook[CrossJob] = SlotBook({name: side.pages for name, side in sides.items()}, jobs, drop,
                                        lambda slot: slots[slot] is not None and slots[slot].mode == DONE)
    for side in sides.values():
        side.book = book
    stats = stats if stats is not None else EncoderStats()
    base = jax.random.key(cfg["seed"])
    chunk = int(cfg["iterations_per_sync"])
    at_capacity = 0
    teacher_prompts: dict[int, IncrementalEncoder] = {}  # encoded for admission, handed to the trajectory
    while book.busy:
        _admit(spec, sides, slots, book, teacher_prompts, stats, cfg, chunk)
        if counters is not None:
            counters.syncs += 1
        _explore(spec, sides, slots, base, chunk)
        _judge(spec, sides, slots, cfg)
        _teach(spec, sides, slots, base, chunk, cfg)
        for i, traj in enumerate(slots):
            if traj is not None and traj.mode == DONE:
                at_capacity += traj.at_capacity
                book.finish(i)
                drop(i)
                yield traj.job, build_cross_record(traj, student_tokenizer, teacher_tokenizer, policy=policy,
                                                   revise=cfg["revise"])
    if counters is not None:
        counters.preemptions += book.preemptions
        counters.started += book.started
    log.info("cross-vocabulary synthesis: %d incremental encodes, %d characters encoded, %d full re-encodes; %d "
             "preemption(s)", stats.calls, stats.chars_encoded, stats.full_encodes, book.preemptions)
    if at_capacity:
        log.warning("cross-vocabulary synthesis: %d of %d trajectories reached a cache's capacity (teacher %d "
                    "positions, sized for %.3f teacher tokens per student token; student %d) and were cut there "
                    "(finish 'length')", at_capacity, len(jobs), sides["teacher"].capacity, ratio.for_caches,
                    sides["student"].capacity)


def _keys(base: jax.Array, trajectories: list[_Trajectory | None], model: int) -> np.ndarray:
    """The raw data [B, 2] of each row's key for `model`, computed on this host (the same on every process)."""
    ids = np.asarray([t.job.key_id if t is not None else 0 for t in trajectories], np.uint32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), model))(jnp.asarray(ids))
    return np.asarray(jax.random.key_data(keys))


def _admit(spec: EngineSpec, sides: dict[str, _Side], slots: list[_Trajectory | None], book: SlotBook[CrossJob],
           teacher_prompts: dict[int, IncrementalEncoder], stats: EncoderStats, cfg: Mapping[str, Any],
           chunk: int) -> None:
    """Start the queued jobs both pools have pages for (`SlotBook.admit`) and feed their prompts."""
    def encoder(job: CrossJob) -> IncrementalEncoder:
        # Kept until the job starts: a job that waits for pages is encoded once (a preempted job's rerun starts a
        # fresh encoder; the encoding is exact, so the same ids).
        if job.index not in teacher_prompts:
            teacher_prompts[job.index] = IncrementalEncoder(sides["teacher"].tokenizer, job.teacher_prompt_text,
                                                            stats=stats)
        return teacher_prompts[job.index]

    # A prompt plus one sync of growth in each pool: what the first decode (or the teacher's first chunk) writes.
    admitted = book.admit(lambda job: {"student": len(job.student_prompt) + chunk,
                                       "teacher": len(encoder(job).ids) + chunk})
    started: list[int] = []
    for i, job in admitted:
        slots[i] = _Trajectory(job, list(job.student_prompt), teacher_prompts.pop(job.index),
                               len(job.student_prompt))
        started.append(i)
    if not started:
        return
    # The pages were reserved at admission: these feeds preempt nothing.
    if spec.uses_teacher:
        out = sides["teacher"].feed({i: slots[i].teacher.ids for i in started}, {}, spec.entropy_top_k)
        for i in started:
            slots[i].h_context = 0.0 if cfg["entropy_zero"] else out[i][1]
            slots[i].teacher_forwards += 1
    if not spec.policy.starts_with_teacher:
        sides["student"].feed({i: slots[i].student_ids[:-1] or slots[i].student_ids[:1] for i in started}, {},
                              spec.entropy_top_k)
    for i in started:
        traj = slots[i]
        traj.step_chars = len(traj.teacher.text)
        if spec.policy.starts_with_teacher:
            traj.mode = TEACHER
            traj.teacher_budget = spec.traj_cap


def _decode(side: _Side, rows: dict[int, _Trajectory], base: jax.Array, slots: list[_Trajectory | None], *,
            model: int, rule: Any, step_cap: int, stop_at_step_end: bool, chunk: int,
            context: dict[int, list[int]], budget: dict[int, int]) -> dict[int, tuple[list[int], list[float], int]]:
    """One `decode` call over `rows`: returns per slot (tokens, log-probs, stop reason), for the rows still live
    after the call's pages were reserved (a reservation may preempt rows)."""
    side.reserve({slot: min(len(context[slot]) + chunk, side.capacity) for slot in rows})
    rows = {slot: traj for slot, traj in rows.items() if slots[slot] is traj}
    b = len(slots)
    pending = np.zeros(b, np.int32)
    ctx_len = np.ones(b, np.int32)
    position = np.zeros(b, np.int32)
    automaton = np.zeros(b, np.int32)
    step_len = np.zeros(b, np.int32)
    budgets = np.zeros(b, np.int32)
    stop = np.full(b, STOP_BUDGET, np.int32)
    for slot, traj in rows.items():
        ids = context[slot]
        pending[slot], ctx_len[slot] = ids[-1], len(ids)
        position[slot] = traj.student_position if model == 0 else traj.teacher_position
        automaton[slot], step_len[slot] = traj.automaton, len(traj.step_ids)
        budgets[slot] = budget[slot]
        stop[slot] = RUNNING if budget[slot] > 0 else STOP_BUDGET
    side.cache = side.pages.commit(side.cache)
    put = lambda a: side.io.put(a, P("data"))  # noqa: E731
    state = DecodeRows(keys=side.io.keys(_keys(base, slots, model)), position=put(position), pending=put(pending),
                       ctx_len=put(ctx_len), automaton=put(automaton), step_len=put(step_len), budget=put(budgets),
                       stop=put(stop), out=put(np.zeros((b, chunk), np.int32)),
                       out_logp=put(np.zeros((b, chunk), np.float32)), out_len=put(np.zeros((b,), np.int32)))
    side.cache, state = decode(side.model_def, side.params, side.cache, rule, step_cap, stop_at_step_end, side.tables,
                               state, side.groups)
    out, logp, n, stop, automaton = side.io.get((state.out, state.out_logp, state.out_len, state.stop,
                                                 state.automaton))
    result = {}
    for slot, traj in rows.items():
        tokens = out[slot, :n[slot]].tolist()
        # The cache now holds the context and every new token but the last (the next pending one).
        side.held[slot] = context[slot] + tokens[:-1] if tokens else side.held[slot]
        traj.automaton = int(automaton[slot])
        if model == 0:
            traj.student_position += len(tokens)
        else:
            traj.teacher_position += len(tokens)
        result[slot] = (tokens, logp[slot, :n[slot]].tolist(), int(stop[slot]))
    return result


def _explore(spec: EngineSpec, sides: dict[str, _Side], slots: list[_Trajectory | None], base: jax.Array,
             chunk: int) -> None:
    """Decode student tokens until every exploring slot has ended its step (or its trajectory budget)."""
    while True:
        rows = {i: t for i, t in enumerate(slots) if t is not None and t.mode == EXPLORE and not _step_done(t, spec)}
        if not rows:
            return
        # At least one token: text the teacher wrote may already have filled the trajectory; the student's next
        # token then ends the step and the trajectory (as in the shared engine).
        budget = {i: max(spec.traj_cap - (len(t.student_ids) - t.prompt_len), 1) for i, t in rows.items()}
        out = _decode(sides["student"], rows, base, slots, model=0, rule=spec.student_rule, step_cap=spec.step_cap,
                      stop_at_step_end=True, chunk=chunk, context={i: t.student_ids for i, t in rows.items()},
                      budget=budget)
        for slot, (tokens, logp, stop) in out.items():
            traj = rows[slot]
            traj.student_ids += tokens
            traj.step_ids += tokens
            traj.step_logp += logp
            traj.step_stop = stop


def _step_done(traj: _Trajectory, spec: EngineSpec) -> bool:
    return traj.step_stop != RUNNING


def _judge(spec: EngineSpec, sides: dict[str, _Side], slots: list[_Trajectory | None], cfg: Mapping[str, Any]) -> None:
    """Score every finished student step with one batched teacher forward and apply the policy."""
    policy = spec.policy
    ended = {i: t for i, t in enumerate(slots) if t is not None and t.mode == EXPLORE and _step_done(t, spec)}
    if not ended:
        return
    before = {}
    for slot, traj in list(ended.items()):
        before[slot] = len(traj.teacher.ids)
        traj.teacher.append_bytes(b"".join(sides["student"].text_bytes[t] for t in traj.step_ids))
        if policy.needs_teacher and len(traj.teacher.ids) > sides["teacher"].capacity:
            # The teacher's encoding outgrew its cache (sized from the measured token ratio, `cross_sizing`): the
            # step cannot be scored, so the trajectory ends with the steps judged so far.
            traj.mode, traj.finish, traj.at_capacity = DONE, FINISH_LENGTH, True
            del ended[slot]
    # The released code's artefact (a): the token at logprob_start_len comes back without a log-probability.
    skip = 1 if cfg["first_token_unscored"] else 0
    scored = (sides["teacher"].feed({i: t.teacher.ids for i, t in ended.items()},
                                    {i: b + skip for i, b in before.items()}, spec.entropy_top_k)
              if policy.needs_teacher else {})
    for slot, traj in ended.items():
        if slots[slot] is not traj:
            continue  # preempted for the scoring's pages: it reruns from its job
        n_teacher = len(traj.teacher.ids) - before[slot] - skip
        if policy.needs_teacher:
            traj.teacher_forwards += 1
            total, h_next = scored[slot]
            # No scored token: the step added no teacher token (its bytes wait for the next character), or, under
            # artefact (a), a one-token step, which the released code scores 0.
            value = float(np.exp(total / n_teacher)) if n_teacher > 0 else (0.0 if skip else 1.0)
            h_next = 0.0 if cfg["entropy_zero"] else h_next  # the released code's artefact (b)
        else:
            h_next, value = 0.0, float("nan")
        n_student = max(len(traj.step_logp), 1)
        v_student = float(np.exp(sum(traj.step_logp) / n_student))
        eps = float(policy.boundary(jnp.asarray(traj.h_context, jnp.float32)))
        accept = bool(policy.judge(jnp.asarray(value, jnp.float32), jnp.asarray(v_student, jnp.float32),
                                   jnp.asarray(eps, jnp.float32))) if policy.needs_teacher else True
        traj.steps.append(StepRecord("student", list(traj.step_ids), traj.step_chars, value, eps, traj.h_context,
                                     kept=accept))
        stop = traj.step_stop
        traj.step_stop = RUNNING
        traj.step_ids, traj.step_logp, traj.automaton = [], [], 0
        if accept:
            traj.h_context = h_next
            traj.step_chars = len(traj.teacher.text)
            if stop == STOP_EOS:
                traj.mode, traj.finish = DONE, FINISH_EOS
            elif len(traj.student_ids) - traj.prompt_len >= spec.traj_cap:
                traj.mode, traj.finish = DONE, FINISH_LENGTH
            elif len(traj.steps) >= spec.max_steps:
                traj.mode, traj.finish = DONE, FINISH_MAX_STEPS
            continue
        _backtrack(spec, sides, traj, slot)


def _backtrack(spec: EngineSpec, sides: dict[str, _Side], traj: _Trajectory, slot: int) -> None:
    """Rewind the context text to the start of the root-cause step and hand the slot to the teacher."""
    policy = spec.policy
    t = len(traj.steps)
    values = np.asarray([[s.value for s in traj.steps]], np.float32)
    t_star = int(root_cause(values, np.asarray([t]))[0]) if policy.backtrack else t
    # The context holds the kept steps before t* (a one-step policy's rejected steps were rewound away).
    safe = sum(len(s.student_ids) for s in traj.steps[:t_star - 1] if s.kept)
    if not traj.breach_step:
        traj.breach_step, traj.root_step, traj.safe_tokens = t, t_star, safe
    traj.interventions += 1
    traj.teacher.truncate(traj.steps[t_star - 1].context_chars)
    traj.student_ids = traj.student_ids[:traj.prompt_len + safe]
    # The pages past the safe state go back to the pools (the caches are re-fed from there when needed).
    sides["student"].rewind(slot, len(traj.student_ids) - 1)
    sides["teacher"].rewind(slot, _common_prefix(sides["teacher"].held[slot], traj.teacher.ids))
    traj.mode = TEACHER
    traj.teacher_budget = max(spec.teacher_min_budget, spec.traj_cap - safe)
    traj.step_chars = len(traj.teacher.text)


def _teach(spec: EngineSpec, sides: dict[str, _Side], slots: list[_Trajectory | None], base: jax.Array, chunk: int,
           cfg: Mapping[str, Any]) -> None:
    """The teacher writes for every slot it holds: the rest of the trajectory, or one step (one-step policies)."""
    one_step = spec.policy.teacher_writes == "one_step"
    teacher = sides["teacher"]
    while True:
        rows = {i: t for i, t in enumerate(slots) if t is not None and t.mode == TEACHER}
        if not rows:
            return
        # Decoding continues from context[:-1] in the cache: after a rewind (or a new context) re-feed what changed.
        context = {i: t.teacher.ids + t.step_ids for i, t in rows.items()}
        teacher.feed({i: ids[:-1] for i, ids in context.items() if len(ids) > 1 and teacher.held[i] != ids[:-1]}, {},
                     spec.entropy_top_k)
        rows = {i: t for i, t in rows.items() if slots[i] is t}  # the feed's pages may have preempted some
        if not rows:
            continue
        # The teacher writes within its cache: a context that leaves less room than the budget cuts it (rare: the
        # cache holds the measured token ratio's share of the student's capacity plus the whole budget).
        budget = {i: max(min(t.teacher_budget, teacher.capacity - len(context[i])), 0) for i, t in rows.items()}
        for i, t in rows.items():
            t.at_capacity |= budget[i] < t.teacher_budget
        out = _decode(teacher, rows, base, slots, model=1, rule=spec.teacher_rule, step_cap=spec.step_cap,
                      stop_at_step_end=one_step, chunk=chunk, context=context, budget=budget)
        handed_back = {}
        for slot, (tokens, _, stop) in out.items():
            traj = rows[slot]
            traj.step_ids += tokens
            traj.teacher_budget -= len(tokens)
            traj.teacher_forwards += len(tokens)
            if stop == RUNNING:
                continue
            if stop == STOP_EOS or stop == STOP_BUDGET or not one_step:
                traj.finish = FINISH_EOS if stop == STOP_EOS else FINISH_TEACHER_BUDGET
                traj.steps.append(StepRecord("teacher", [], traj.step_chars, float("nan"), 0.0, 0.0,
                                             teacher_ids=list(traj.step_ids), is_step=False))
                traj.mode = DONE
                continue
            _hand_back(sides, traj)
            if len(traj.student_ids) >= sides["student"].capacity:
                # The teacher's step, in the student's tokens, filled the student's cache (sized for the prompt and
                # traj_cap): the trajectory is over its cap anyway, so it ends here instead of writing past the cache.
                traj.mode, traj.finish, traj.at_capacity = DONE, FINISH_LENGTH, True
                continue
            handed_back[slot] = traj
        # Both caches take the new context: the teacher its canonical encoding (and the entropy after it, which
        # sets the next step's boundary), the student its ids but the pending last one.
        entropy = teacher.feed({i: t.teacher.ids for i, t in handed_back.items()}, {}, spec.entropy_top_k)
        sides["student"].feed({i: t.student_ids[:-1] for i, t in handed_back.items()}, {}, spec.entropy_top_k)
        for slot, traj in handed_back.items():
            if slots[slot] is not traj:
                continue  # preempted for the feeds' pages
            traj.h_context = 0.0 if cfg["entropy_zero"] else entropy[slot][1]
            if len(traj.steps) >= spec.max_steps:
                traj.mode, traj.finish = DONE, FINISH_MAX_STEPS


def pools_plan(cfg: Mapping[str, Any], student: Decoder, teacher: Decoder, ratio: TokenRatio, *, wanted: int,
               groups: int = 1) -> TextPathPlan:
    """Both models' page pools for `wanted` slots per engine group (`cross_sizing.plan_text_path`): `num_pages` each
    when set, else from what the loaded weights leave on one group: `memory_budget_gb` (weights included, split over
    `groups` like the token engine's pools) when set, else the group's free device memory (on CPU a quarter of the
    host RAM less the weights). Raises MemoryError when a pool cannot hold one trajectory at full capacity plus the
    other slots' prompts."""
    weights = weight_bytes(student, teacher)
    if cfg.get("memory_budget_gb"):
        free = cfg["memory_budget_gb"] * GIB / groups - weights
        where = f"memory_budget_gb={cfg['memory_budget_gb']:g}" + (f" over {groups} engine groups" if groups > 1 else "")
    else:
        free, where = device_memory(free=True)  # on accelerators: free now, the weights already loaded
        free /= groups
        if not memory_over_devices()[1]:
            free -= weights
        where += f" / {groups} engine groups" if groups > 1 else ""
        mesh = model_mesh(student)
        if mesh is not None and mesh.is_multi_process:
            # One engine over several hosts runs one host loop in each: all must plan the same slots, those that
            # fit the host with the least free memory.
            from jax.experimental import multihost_utils

            free = float(np.min(multihost_utils.process_allgather(np.asarray([free], np.float32))))  # no x64 in jax
            where += f", the least over {jax.process_count()} processes"
    plan = plan_text_path(cfg, student.config, teacher.config, ratio.for_caches, wanted=wanted, free_bytes=free,
                          where=where, groups=groups)
    if plan.slots < 1:
        raise MemoryError(plan.refusal())
    log.info("%s", plan.describe())
    return plan


def _hand_back(sides: dict[str, _Side], traj: _Trajectory) -> None:
    """One-step policies: the teacher's step joins the context text and the student continues from it."""
    teacher_tok, student_tok = sides["teacher"].tokenizer, sides["student"].tokenizer
    text = decode_reply(teacher_tok, traj.step_ids)
    student_ids = list(student_tok(text, add_special_tokens=False)["input_ids"])
    traj.steps.append(StepRecord("teacher", student_ids, traj.step_chars, float("nan"), 0.0, 0.0,
                                 teacher_ids=list(traj.step_ids)))
    traj.teacher.append(text)
    traj.student_ids += student_ids
    traj.step_ids, traj.automaton = [], 0
    traj.step_chars = len(traj.teacher.text)
    traj.mode = EXPLORE
