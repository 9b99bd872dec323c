"""The engine's host loop: jobs in, finished slots out, with continuous batching on paged KV caches.

Each sync: read the slots that finished (their rows of the record arrays), free their slots and pages; let
the scheduler top up the live slots and admit queued jobs (`scheduler.Scheduler`); commit the page tables;
stop released slots and prefill only the new ones (one cache-free pass per prompt-length bucket); then run
the jitted loop for up to `iterations_per_sync` iterations or until a slot finishes. Synthesis (every policy),
evaluation, on-policy rollouts and `generate` all run through it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from motab_jax.models.paged_cache import PageAllocator, PagedKVCache
from motab_jax.models.sharding import SAMPLING_RULES
from motab_jax.models.transformer import Decoder
from motab_jax.motab.engine import EngineSpec, read_rows, release_slots, run_iterations, start_slots
from motab_jax.motab.pool import PoolPlan
from motab_jax.motab.scheduler import Scheduler
from motab_jax.motab.state import CACHE_FIELDS, EngineState, empty_state
from motab_jax.motab.transition import EngineTables
from motab_jax.sampling.sampler import bucket

log = logging.getLogger("motab_jax")


@dataclasses.dataclass(frozen=True)
class Job:
    index: int  # the caller's id for the result
    prompt: tuple[int, ...]
    key_id: int  # folded into the seed: the trajectory's random keys depend on it, not on its slot or timing


@dataclasses.dataclass
class EngineStats:
    """Counters of one engine run (what the host scheduled; for logs, tests and benchmarks)."""

    syncs: int = 0
    iterations: int = 0
    preemptions: int = 0
    started: int = 0
    prefill_calls: int = 0
    prefill_rows: int = 0  # rows the prefills computed (padded to a power of two)
    prefill_tokens: int = 0  # rows x bucketed prompt width
    prefill_shapes: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (started, rows, width)
    pool: PoolPlan | None = None
    pool_sharding: PartitionSpec | None = None  # of the student's page pool on a mesh (None: one device)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _placed(state: EngineState, mesh: jax.sharding.Mesh | None) -> EngineState:
    """On a mesh: page pools split over KV heads by the sampling rules, the small per-slot arrays replicated."""
    if mesh is None:
        return state
    rest = dataclasses.replace(state, student_cache=None, teacher_cache=None)
    rest = jax.device_put(rest, NamedSharding(mesh, PartitionSpec()))
    return dataclasses.replace(rest, **{name: getattr(state, name).placed(mesh, SAMPLING_RULES)
                                        for name in CACHE_FIELDS})


def _mesh_of(params: Any) -> jax.sharding.Mesh | None:
    sharding = jax.tree.leaves(params)[0].sharding
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def _commit(cache: PagedKVCache, table: np.ndarray) -> PagedKVCache:
    return dataclasses.replace(cache, page_table=jax.device_put(table, cache.page_table.sharding))


def run_engine(spec: EngineSpec, student: Decoder, teacher: Decoder, tables: EngineTables, jobs: Sequence[Job], *,
               pool: PoolPlan, paged_impl: str, iterations_per_sync: int, seed: int,
               stats: EngineStats | None = None) -> Iterator[tuple[Job, dict[str, np.ndarray]]]:
    """Run every job to its end; yields (job, that slot's row of every `RECORD_FIELDS` array) as they finish."""
    pool.check()
    stats = stats if stats is not None else EngineStats()
    stats.pool = pool
    b, page = pool.num_slots, pool.page_size
    student_def, student_params = nnx.split(student)
    teacher_def, teacher_params = nnx.split(teacher)
    student_cache = student.init_paged_cache(b, pool.max_len, page_size=page, num_pages=pool.num_pages,
                                             impl=paged_impl)
    # A policy without the teacher gets a token teacher pool: the null page and one more.
    teacher_cache = (teacher.init_paged_cache(b, pool.max_len, page_size=page, num_pages=pool.num_pages,
                                              impl=paged_impl) if spec.uses_teacher
                     else teacher.init_paged_cache(b, page, page_size=page, num_pages=2, impl=paged_impl))
    allocators = [PageAllocator.for_cache(student_cache)] + ([PageAllocator.for_cache(teacher_cache)]
                                                              if spec.uses_teacher else [])
    state = _placed(empty_state(b, spec.out_cap, spec.max_steps, student_cache, teacher_cache), _mesh_of(student_params))
    sharding = state.student_cache.k_pages.sharding
    stats.pool_sharding = sharding.spec if isinstance(sharding, NamedSharding) else None
    growth = iterations_per_sync * spec.tokens_per_iteration + 1
    scheduler: Scheduler[Job] = Scheduler(b, allocators, growth, pool.max_len)
    for job in jobs:
        scheduler.submit(job, len(job.prompt))
    base_key = jax.random.key(seed)
    ctx_len = np.zeros(b, np.int64)
    release = np.zeros(b, bool)
    log.info("engine (%s): %d jobs, %d slots; %s", spec.policy.name, len(jobs), b, pool.describe())
    while True:
        plan = scheduler.plan(ctx_len)
        release |= plan.release
        state = dataclasses.replace(state, student_cache=_commit(state.student_cache, allocators[0].table))
        if spec.uses_teacher:
            state = dataclasses.replace(state, teacher_cache=_commit(state.teacher_cache, allocators[1].table))
        if release.any():
            state = release_slots(state, jnp.asarray(release))
            release[:] = False
        state = _start(spec, student_def, teacher_def, student_params, teacher_params, state, plan.started, base_key,
                       stats)
        for slot, job in plan.started:
            ctx_len[slot] = len(job.prompt)
        stats.preemptions = scheduler.preemptions
        if scheduler.idle:
            if stats.preemptions:
                log.info("engine (%s): %d preemption(s) in all", spec.policy.name, stats.preemptions)
            return
        # With nothing queued a finished slot cannot be refilled: run on until every slot is done.
        state, count = run_iterations(spec, student_def, teacher_def, student_params, teacher_params, tables, state,
                                      jnp.asarray(iterations_per_sync, jnp.int32), jnp.asarray(bool(scheduler.queue)))
        finished, ctx_len, dropped = jax.device_get(
            (state.finished, state.ctx_len, state.student_cache.dropped.sum() + state.teacher_cache.dropped.sum()))
        stats.syncs, stats.iterations = stats.syncs + 1, stats.iterations + int(count)
        if dropped:
            raise RuntimeError(f"engine: {int(dropped)} KV writes found no page: the scheduler's top-up is wrong "
                               "(a bug; please report it with the configuration)")
        ctx_len = np.asarray(ctx_len, np.int64)
        done = np.flatnonzero(finished)
        if done.size:
            rows = jax.device_get(read_rows(state, jnp.asarray(done)))
            for n, slot in enumerate(done):
                job = scheduler.finish(int(slot))
                yield job, {name: values[n] for name, values in rows.items()}
            release[done] = True


def _start(spec: EngineSpec, student_def: Any, teacher_def: Any, student_params: Any, teacher_params: Any,
           state: EngineState, started: list[tuple[int, Job]], base_key: jax.Array, stats: EngineStats) -> EngineState:
    """Prefill and reset the started slots: one call per prompt-width bucket, rows padded to a power of two."""
    groups: dict[int, list[tuple[int, Job]]] = {}
    for slot, job in started:
        groups.setdefault(bucket(len(job.prompt)), []).append((slot, job))
    b = state.num_slots
    for width, group in sorted(groups.items()):
        n = _pow2(len(group))
        slots = np.full(n, b, np.int32)  # index b: padding, skipped by every write
        prompts = np.zeros((n, width), np.int32)
        lens = np.ones(n, np.int32)
        ids = np.zeros(n, np.uint32)
        for i, (slot, job) in enumerate(group):
            slots[i], lens[i], ids[i] = slot, len(job.prompt), job.key_id
            prompts[i, :len(job.prompt)] = job.prompt
        keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(jnp.asarray(ids))
        state = start_slots(spec, student_def, teacher_def, student_params, teacher_params, state, jnp.asarray(slots),
                            jnp.asarray(prompts), jnp.asarray(lens), keys)
        stats.prefill_calls += 1
        stats.prefill_rows += n
        stats.prefill_tokens += n * width
        stats.prefill_shapes.append((len(group), n, width))
        stats.started += len(group)
    return state
