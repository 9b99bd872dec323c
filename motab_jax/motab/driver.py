"""The engine's host loop: jobs in, finished slots out, with continuous batching on paged KV caches.

Each sync: read the slots that finished (their rows of the record arrays), free their slots and pages; let
the scheduler top up the live slots and admit queued jobs (`scheduler.Scheduler`); commit the page tables;
stop released slots and prefill only the new ones (one cache-free pass per prompt-length bucket); then run
the jitted loop for up to `iterations_per_sync` iterations or until a slot finishes. Synthesis (every policy),
evaluation, on-policy rollouts and `generate` all run through it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import zlib
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from motab_jax.errors import EnvironmentProblem, PromptTooLongError
from motab_jax.models.paged_cache import PageAllocator, PagedKVCache
from motab_jax.models.sharding import SAMPLING_RULES, data_groups
from motab_jax.models.transformer import Decoder
from motab_jax.motab.engine import EngineSpec, read_rows, release_slots, run_iterations, start_slots
from motab_jax.motab.pool import PoolPlan
from motab_jax.motab.scheduler import Scheduler
from motab_jax.motab.state import CACHE_FIELDS, SLOT_FIELDS, EngineState, empty_state
from motab_jax.motab.transition import EngineTables
from motab_jax.sampling.sampler import bucket
from motab_jax.text.incremental import EncoderStats

log = logging.getLogger("motab_jax")

# How synthesis's user makes the pools of one engine over several processes equal (`check_same_everywhere`).
SYNTHESIS_POOL_HINT = "set the pool's size explicitly, synthesis.num_pages, when the hosts' free memory differs"


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
    encoding: EncoderStats | None = None  # text-level scoring: the host's incremental re-encoding (calls, time)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _state_shardings(shapes: EngineState, mesh: Mesh) -> EngineState:
    """Where each field of the state lives on `mesh`, by the sampling rules: page pools over KV heads within a
    group; slots, page tables and pools over `data`, one engine group per data index."""
    slots = NamedSharding(mesh, PartitionSpec("data"))
    rest = {name: slots for name in SLOT_FIELDS}
    caches = {name: getattr(shapes, name).shardings(mesh, SAMPLING_RULES) for name in CACHE_FIELDS}
    return dataclasses.replace(shapes, **rest, **caches)


def created_in_place(make: Callable[[], Any], mesh: Mesh | None, shardings: Callable[[Any, Mesh], Any]) -> Any:
    """`make()` (an empty state or cache), created in place on `mesh` where `shardings(shapes, mesh)` says: each
    device computes only its shard, so no host or single device ever holds a whole pool, and a mesh spanning
    processes needs no transfer from a host."""
    if mesh is None:
        return make()
    return jax.jit(make, out_shardings=shardings(jax.eval_shape(make), mesh))()


class HostIO:
    """Host values to and from the engine's arrays. On a mesh spanning processes (one engine over several hosts)
    every process runs the same host loop on the same values: an input is assembled from each process's own
    copy of the value (`make_array_from_callback`), and an output is gathered so that every process reads all of
    it (`process_allgather`), so the next decision is the same everywhere."""

    def __init__(self, mesh: Mesh | None):
        self.mesh = mesh

    def put(self, value: np.ndarray, spec: PartitionSpec = PartitionSpec()) -> jax.Array:
        """`value` (the same on every process) as an array split by `spec` (default: replicated)."""
        value = np.array(value)  # a copy: the caller reuses its buffer, and a CPU transfer may alias it
        if self.mesh is None:
            return jnp.asarray(value)
        return to_global(value, NamedSharding(self.mesh, spec))

    def keys(self, key_data: np.ndarray) -> jax.Array:
        """Typed PRNG keys from their raw data [n, 2] (the same on every process), split over `data`."""
        return jax.random.wrap_key_data(self.put(key_data, PartitionSpec("data")))

    def get(self, tree: Any) -> Any:
        """numpy values of every array in `tree`, on every process."""
        return jax.tree.map(to_host, tree)


def check_same_everywhere(values: Any, shown: dict[str, int], hint: str) -> None:
    """One engine over several processes runs one host loop in each: refuse to start unless every process holds the
    same `values` (what its host decisions depend on: jobs, plan, seed), else their decisions, and the collectives
    they issue, would diverge. `shown`: counts printed per process when they differ; `hint`: what to do."""
    from jax.experimental import multihost_utils

    fingerprint = zlib.crc32(repr(values).encode()) & 0x7FFFFFFF
    gathered = multihost_utils.process_allgather(np.asarray([fingerprint, *shown.values()], np.int32))
    if (gathered != gathered[:1]).any():
        raise EnvironmentProblem(f"one engine over {jax.process_count()} processes: their jobs or plans differ (per "
                                 f"process [fingerprint, {', '.join(shown)}]: {gathered.tolist()}); every process "
                                 f"must see the same questions, finished records and memory budget ({hint})")


def _check_pool_everywhere(pool: PoolPlan, jobs: Sequence[Job], seed: int, pool_hint: str) -> None:
    plan = (pool.num_slots, pool.page_size, pool.max_len, pool.max_prompt_len, pool.num_pages, pool.groups)
    check_same_everywhere((plan, seed, [(j.index, j.key_id, j.prompt) for j in jobs]),
                          {"jobs": len(jobs), "pages per group": pool.num_pages}, pool_hint)


def to_global(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """`value`, which every process holds identically, as an array placed by `sharding` (which may span
    processes: each process places its own devices' slices)."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(array: jax.Array) -> np.ndarray:
    """The whole of `array` as numpy on every process (a gather across processes when it spans them)."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _mesh_of(params: Any) -> Mesh | None:
    sharding = jax.tree.leaves(params)[0].sharding
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def model_mesh(model: Decoder) -> Mesh | None:
    """The mesh `model`'s parameters are placed on (None: one device, no mesh)."""
    return _mesh_of(nnx.state(model, nnx.Param))


def engine_groups(model: Decoder) -> int:
    """Engine groups the engine runs `model` in: the data axis of its parameters' mesh (1 on one device)."""
    return data_groups(model_mesh(model))


def _commit(cache: PagedKVCache, table: np.ndarray) -> PagedKVCache:
    return dataclasses.replace(cache, page_table=to_global(table, cache.page_table.sharding))


class _Groups:
    """The host side of G engine groups: one scheduler per group (its slots and page allocators, group-local
    slot and page ids) over one shared queue; global slot g * slots_per_group + local."""

    def __init__(self, pool: PoolPlan, pools: int, pages_per_seq: int, growth: int):
        self.size = pool.slots_per_group
        queue: collections.deque = collections.deque()
        self.allocators = [[PageAllocator(pool.num_pages, pool.page_size, self.size, pages_per_seq)
                            for _ in range(pools)] for _ in range(pool.groups)]
        self.schedulers: list[Scheduler[Job]] = [Scheduler(self.size, a, growth, pool.max_len, queue=queue)
                                                 for a in self.allocators]

    def submit(self, job: Job) -> None:
        self.schedulers[0].submit(job, len(job.prompt))

    def plan(self, ctx_len: np.ndarray) -> tuple[list[tuple[int, Job]], np.ndarray]:
        """(started (global slot, job), release [B]) over every group, group 0 first."""
        started, release = [], []
        for g, scheduler in enumerate(self.schedulers):
            plan = scheduler.plan(ctx_len[g * self.size:(g + 1) * self.size])
            started += [(g * self.size + slot, job) for slot, job in plan.started]
            release.append(plan.release)
        return started, np.concatenate(release)

    def table(self, pool: int) -> np.ndarray:
        return np.concatenate([a[pool].table for a in self.allocators])

    def finish(self, slot: int) -> Job:
        return self.schedulers[slot // self.size].finish(slot % self.size)

    @property
    def queued(self) -> bool:
        return bool(self.schedulers[0].queue)

    @property
    def idle(self) -> bool:
        return all(s.idle for s in self.schedulers)

    @property
    def preemptions(self) -> int:
        return sum(s.preemptions for s in self.schedulers)


def run_engine(spec: EngineSpec, student: Decoder, teacher: Decoder, tables: EngineTables, jobs: Sequence[Job], *,
               pool: PoolPlan, paged_impl: str, iterations_per_sync: int, seed: int,
               stats: EngineStats | None = None, pool_hint: str = SYNTHESIS_POOL_HINT
               ) -> Iterator[tuple[Job, dict[str, np.ndarray]]]:
    """Run every job to its end; yields (job, that slot's row of every `RECORD_FIELDS` array) as they finish.
    `pool_hint`: how the caller's user makes every process's pool the same (quoted when they differ, one engine over
    several processes).

    A prompt longer than `pool.max_prompt_len` (what the pools and every slot's positions were sized for) is
    refused with `PromptTooLongError` before anything runs: its writes past the cache would be lost."""
    pool.check()
    for job in jobs:
        if len(job.prompt) > pool.max_prompt_len:
            raise PromptTooLongError(f"engine job {job.index}: the prompt has {len(job.prompt)} tokens > "
                                     f"max_prompt_len={pool.max_prompt_len}, what the pools were planned for; raise "
                                     "max_prompt_len or shorten the prompt")
    stats = stats if stats is not None else EngineStats()
    stats.pool = pool
    b, page = pool.num_slots, pool.page_size
    student_def, student_params = nnx.split(student)
    teacher_def, teacher_params = nnx.split(teacher)
    mesh = _mesh_of(student_params)
    if data_groups(mesh) != pool.groups:
        raise ValueError(f"the pool plan has {pool.groups} engine group(s) but the models' mesh has a data axis of "
                         f"{data_groups(mesh)}: plan the pool with groups=data_groups(mesh)")
    if mesh is not None and mesh.is_multi_process:
        _check_pool_everywhere(pool, jobs, seed, pool_hint)
    groups = mesh if pool.groups > 1 else None
    # The caches hold every group's pool back to back; inside the loop each group sees its own (shard_map).
    num_pages = pool.groups * pool.num_pages

    def make() -> EngineState:
        student_cache = student.init_paged_cache(b, pool.max_len, page_size=page, num_pages=num_pages,
                                                 impl=paged_impl)
        # A policy without the teacher gets a token teacher pool: the null page and one more per group.
        teacher_cache = (
            teacher.init_paged_cache(b, pool.max_len, page_size=page, num_pages=num_pages, impl=paged_impl)
            if spec.uses_teacher
            else teacher.init_paged_cache(b, page, page_size=page, num_pages=2 * pool.groups, impl=paged_impl))
        return empty_state(b, spec.out_cap, spec.max_steps, student_cache, teacher_cache)

    state = created_in_place(make, mesh, _state_shardings)
    io = HostIO(mesh)
    tables = jax.tree.map(lambda a: io.put(np.asarray(a)), tables) if mesh is not None else tables
    sharding = state.student_cache.k_pages.sharding
    stats.pool_sharding = sharding.spec if isinstance(sharding, NamedSharding) else None
    growth = iterations_per_sync * spec.tokens_per_iteration + 1
    host = _Groups(pool, 2 if spec.uses_teacher else 1, state.student_cache.pages_per_seq, growth)
    for job in jobs:
        host.submit(job)
    base_key = jax.random.key(seed)
    ctx_len = np.zeros(b, np.int64)
    release = np.zeros(b, bool)
    log.info("engine (%s): %d jobs, %d slots; %s", spec.policy.name, len(jobs), b, pool.describe())
    while True:
        started, preempted = host.plan(ctx_len)
        release |= preempted
        state = dataclasses.replace(state, student_cache=_commit(state.student_cache, host.table(0)))
        if spec.uses_teacher:
            state = dataclasses.replace(state, teacher_cache=_commit(state.teacher_cache, host.table(1)))
        if release.any():
            state = release_slots(state, io.put(release, PartitionSpec("data")))
            release[:] = False
        state = _start(spec, student_def, teacher_def, student_params, teacher_params, state, started, base_key,
                       stats, host.size, groups, io)
        for slot, job in started:
            ctx_len[slot] = len(job.prompt)
        stats.preemptions = host.preemptions
        if host.idle:
            if stats.preemptions:
                log.info("engine (%s): %d preemption(s) in all", spec.policy.name, stats.preemptions)
            return
        # With nothing queued a finished slot cannot be refilled: run on until every slot is done.
        state, count = run_iterations(spec, student_def, teacher_def, student_params, teacher_params, tables, state,
                                      io.put(np.int32(iterations_per_sync)), io.put(np.bool_(host.queued)), groups)
        finished, ctx_len, dropped, count = io.get(
            (state.finished, state.ctx_len, state.student_cache.dropped.sum() + state.teacher_cache.dropped.sum(),
             count))
        stats.syncs, stats.iterations = stats.syncs + 1, stats.iterations + int(count)
        if dropped:
            raise RuntimeError(f"engine: {int(dropped)} KV writes found no page: the scheduler's top-up is wrong "
                               "(a bug; please report it with the configuration)")
        ctx_len = np.asarray(ctx_len, np.int64)
        done = np.flatnonzero(finished)
        if done.size:
            rows = io.get(read_rows(state, io.put(done.astype(np.int32))))
            for n, slot in enumerate(done):
                job = host.finish(int(slot))
                yield job, {name: values[n] for name, values in rows.items()}
            release[done] = True


def _start(spec: EngineSpec, student_def: Any, teacher_def: Any, student_params: Any, teacher_params: Any,
           state: EngineState, started: list[tuple[int, Job]], base_key: jax.Array, stats: EngineStats,
           group_size: int, groups: Mesh | None, io: HostIO) -> EngineState:
    """Prefill and reset the started slots: one call per prompt-width bucket, rows padded to a power of two (per
    engine group: each group gets the same number of rows, with its own slot ids)."""
    buckets: dict[int, list[tuple[int, Job]]] = {}
    for slot, job in started:
        buckets.setdefault(bucket(len(job.prompt)), []).append((slot, job))
    num_groups = 1 if groups is None else groups.shape["data"]
    put = lambda a: io.put(a, PartitionSpec("data"))  # noqa: E731
    for width, members in sorted(buckets.items()):
        per_group: list[list[tuple[int, Job]]] = [[] for _ in range(num_groups)]
        for slot, job in members:
            per_group[slot // group_size].append((slot % group_size, job))
        n = _pow2(max(len(g) for g in per_group))
        slots = np.full((num_groups, n), group_size, np.int32)  # index group_size: padding, skipped by every write
        prompts = np.zeros((num_groups, n, width), np.int32)
        lens = np.ones((num_groups, n), np.int32)
        ids = np.zeros((num_groups, n), np.uint32)
        for g, group in enumerate(per_group):
            for i, (slot, job) in enumerate(group):
                slots[g, i], lens[g, i], ids[g, i] = slot, len(job.prompt), job.key_id
                prompts[g, i, :len(job.prompt)] = job.prompt
        # Computed on this host (the same on every process), then placed like the rows.
        keys = np.asarray(jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(base_key, i))(ids.reshape(-1))))
        state = start_slots(spec, student_def, teacher_def, student_params, teacher_params, state,
                            put(slots.reshape(-1)), put(prompts.reshape(num_groups * n, width)), put(lens.reshape(-1)),
                            io.keys(keys), groups)
        rows = num_groups * n
        stats.prefill_calls += 1
        stats.prefill_rows += rows
        stats.prefill_tokens += rows * width
        stats.prefill_shapes.append((len(members), rows, width))
        stats.started += len(members)
    return state
