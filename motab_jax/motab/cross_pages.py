"""Admission by free pages and preemption for the text-level (cross-vocabulary) engine (`cross_engine`).

Both models' page pools over G engine groups behind global slot ids (slot g * per_group + local is local slot
`local` of group g, whose pools have their own null page), the queue of jobs and which job each slot runs.

Why not `scheduler.Scheduler`: it reserves one length per slot in every pool (on the token path both models hold
the same positions) once per sync, before one device loop. Here the student's pool holds student tokens and the
teacher's teacher tokens (their counts differ by the token ratio and by what each model wrote), and one round runs
several device calls (the student decodes until its steps end, the teacher scores them, then writes chunk after
chunk), each growing one model's cache. So pages are reserved per call in one pool, and a pool that runs dry
preempts there. The rules are the Scheduler's:
- Reservation: the rows of a call get pages for what the call writes, oldest trajectory first.
- Preemption: when a pool of group g cannot supply them, the most recently started trajectory of g stops, its pages
  are freed in BOTH pools and its job goes back to the head of the queue. Its random keys depend on the job (and
  the count of tokens it sampled), not on its slot or when it ran, and its host state (encoders, steps) is rebuilt
  from the job, so its rerun gives the same record.
- Admission: a queued job starts, in queue order, only when a slot is free and both pools of that slot's group have
  pages for its prompt plus one sync of growth (reserved at once); a group that preempted since the last admission
  admits nothing (its pools are under pressure: a start now would only be stopped again).
Every decision is a function of host state (lengths, start order), so the processes of one engine over several
hosts, which run the same host loop on the same values, take the same decisions.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Callable, Generic, Mapping, Sequence, TypeVar

import numpy as np

from motab_jax.models.paged_cache import PageAllocator, PagedKVCache
from motab_jax.motab.driver import to_global
from motab_jax.motab.pool import pages_for

log = logging.getLogger("motab_jax")

JobT = TypeVar("JobT")


class GroupPages:
    """One model's page allocators of G engine groups behind global slot ids."""

    def __init__(self, groups: int, per_group: int, pages_per_seq: int, page_size: int, num_pages: int):
        """`num_pages`: pages of each group's pool, the null page included."""
        if num_pages < pages_per_seq + 1:
            raise MemoryError(f"a KV page pool of {num_pages} pages (null page included) cannot hold one trajectory "
                              f"at full capacity ({pages_per_seq} pages of {page_size} positions + the null page): "
                              "raise synthesis.num_pages or memory_budget_gb, or lower traj_cap or max_prompt_len")
        self.per_group, self.pages_per_seq, self.page_size = per_group, pages_per_seq, page_size
        self.allocators = [PageAllocator(num_pages, page_size, per_group, pages_per_seq) for _ in range(groups)]

    @property
    def capacity(self) -> int:
        """Positions one slot addresses."""
        return self.pages_per_seq * self.page_size

    @property
    def pool_pages(self) -> int:
        """Pages of all groups' pools together."""
        return sum(a.num_pages for a in self.allocators)

    def group(self, slot: int) -> int:
        return slot // self.per_group

    def _of(self, slot: int) -> tuple[PageAllocator, int]:
        return self.allocators[slot // self.per_group], slot % self.per_group

    def can_hold(self, slot: int, num_tokens: int) -> bool:
        """Whether the slot's pool has the pages `slot` lacks for positions [0, num_tokens)."""
        allocator, local = self._of(slot)
        return allocator.pages_needed(local, num_tokens) <= allocator.free_pages

    def ensure(self, slot: int, num_tokens: int) -> None:
        allocator, local = self._of(slot)
        allocator.ensure(local, num_tokens)

    def trim(self, slot: int, num_tokens: int) -> None:
        """Return the slot's pages wholly past position `num_tokens` (after a rewind)."""
        allocator, local = self._of(slot)
        allocator.trim(local, num_tokens)

    def free(self, slot: int) -> None:
        allocator, local = self._of(slot)
        allocator.free(local)

    def pages_of_pool(self, slot: int) -> int:
        """Usable pages of the slot's group's pool (the null page excluded)."""
        return self._of(slot)[0].num_pages - 1

    def held(self, slot: int) -> int:
        allocator, local = self._of(slot)
        return int(allocator.held[local])

    def commit(self, cache: PagedKVCache) -> PagedKVCache:
        table = np.concatenate([a.table for a in self.allocators])
        return dataclasses.replace(cache, page_table=to_global(table, cache.page_table.sharding))


class SlotBook(Generic[JobT]):
    """The queue, which job each slot runs and in which order they started, over every named pool (`pools`: one
    `GroupPages` per model, the same groups and slots)."""

    def __init__(self, pools: Mapping[str, GroupPages], jobs: Sequence[JobT],
                 on_preempt: Callable[[int], None] = lambda slot: None,
                 finished: Callable[[int], bool] = lambda slot: False):
        """`on_preempt(slot)`: the caller drops the slot's trajectory (its pages are already free). `finished(slot)`:
        the slot's trajectory has ended and its record needs no device state: when a pool runs dry its pages are
        taken back first, and it is never preempted (that would only redo it)."""
        self.pools = dict(pools)
        first = next(iter(self.pools.values()))
        self.per_group = first.per_group
        self.num_slots = len(first.allocators) * first.per_group
        self.queue: collections.deque[JobT] = collections.deque(jobs)
        self.jobs: list[JobT | None] = [None] * self.num_slots
        self.started_at = np.zeros(self.num_slots, np.int64)  # start order of the slot's trajectory
        self._clock = 0
        self.preemptions = 0
        self._pressed: set[int] = set()  # groups that preempted since the last admission
        self.on_preempt, self.finished = on_preempt, finished

    def live(self, slot: int) -> bool:
        return self.jobs[slot] is not None

    @property
    def started(self) -> int:
        """Trajectories started so far, reruns of preempted ones included."""
        return self._clock

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(j is not None for j in self.jobs)

    def admit(self, tokens: Callable[[JobT], Mapping[str, int]]) -> list[tuple[int, JobT]]:
        """Start queued jobs in queue order while a free slot's group has, in every pool, the pages for
        `tokens(job)[pool]` positions (its prompt plus one sync of growth); those pages are reserved. Free slots
        are taken group by group in turn (local slot 0 of every group, then 1, ...): the work spreads over them."""
        pressed, self._pressed = self._pressed, set()
        started: list[tuple[int, JobT]] = []
        order = sorted(range(self.num_slots), key=lambda i: (i % self.per_group, i // self.per_group))
        for slot in order:
            if not self.queue:
                break
            if self.jobs[slot] is not None or slot // self.per_group in pressed:
                continue
            job = self.queue[0]
            asked = tokens(job)
            need = {name: min(int(asked[name]), pool.capacity) for name, pool in self.pools.items()}
            for name, pool in self.pools.items():
                if pages_for(need[name], pool.page_size) > pool.pages_of_pool(slot):
                    raise MemoryError(f"a prompt plus one sync of growth needs {need[name]} positions "
                                      f"({pages_for(need[name], pool.page_size)} pages) in the {name}'s KV page pool "
                                      f"but it has {pool.pages_of_pool(slot)} pages: raise synthesis.num_pages or "
                                      "memory_budget_gb, or lower max_prompt_len or iterations_per_sync")
            if not all(pool.can_hold(slot, need[name]) for name, pool in self.pools.items()):
                continue  # another group's pools may hold it
            self.queue.popleft()
            self.jobs[slot] = job
            self._clock += 1
            self.started_at[slot] = self._clock
            for name, pool in self.pools.items():
                pool.ensure(slot, need[name])
            started.append((slot, job))
        return started

    def reserve(self, pool_name: str, needs: Mapping[int, int]) -> list[int]:
        """Give every slot of `needs` pages for that many positions in pool `pool_name`, oldest trajectory first,
        preempting the most recently started trajectory of a group whose pool runs dry (possibly one of `needs`).
        Returns the preempted slots, in order."""
        pool = self.pools[pool_name]
        for slot in needs:  # before preempting anything
            if self.jobs[slot] is None:
                raise KeyError(f"slot {slot} holds no trajectory: nothing to reserve {pool_name} pages for")
            if needs[slot] > pool.capacity:
                raise ValueError(f"slot {slot}: {needs[slot]} positions exceed the {pool_name}'s cache of "
                                 f"{pool.capacity}; a context must end at its cache's capacity")
        preempted: list[int] = []
        for slot in sorted(needs, key=lambda i: self.started_at[i]):
            # A slot preempted for an older one's pages in this call (it was the newest) needs none now.
            while self.jobs[slot] is not None and not pool.can_hold(slot, needs[slot]):
                group = pool.group(slot)
                members = [i for i in range(group * self.per_group, (group + 1) * self.per_group)
                           if self.jobs[i] is not None]
                done = [i for i in members if self.finished(i) and any(p.held(i) for p in self.pools.values())]
                if done:
                    for i in done:
                        for p in self.pools.values():
                            p.free(i)
                    continue
                live = [i for i in members if not self.finished(i)]
                victim = max(live, key=lambda i: self.started_at[i])
                if live == [slot]:
                    # Unreachable when the plan's check passed (a pool holds one trajectory at full capacity).
                    raise MemoryError(f"the {pool_name}'s KV page pool ({pool.pages_of_pool(slot)} pages of "
                                      f"{pool.page_size}) cannot hold one trajectory of {needs[slot]} positions: raise "
                                      "synthesis.num_pages or memory_budget_gb, or lower traj_cap")
                self._preempt(victim)
                preempted.append(victim)
            if self.jobs[slot] is not None:
                pool.ensure(slot, needs[slot])
        return preempted

    def finish(self, slot: int) -> JobT:
        """The slot's trajectory ended and its record was read: free its slot and pages."""
        job = self.jobs[slot]
        if job is None:
            raise KeyError(f"slot {slot} holds no trajectory")
        self._free(slot)
        return job

    def _free(self, slot: int) -> None:
        for pool in self.pools.values():
            pool.free(slot)
        self.jobs[slot] = None

    def _preempt(self, slot: int) -> None:
        job = self.jobs[slot]
        self._free(slot)
        self.queue.appendleft(job)
        self.preemptions += 1
        self._pressed.add(slot // self.per_group)
        self.on_preempt(slot)
        log.info("cross-vocabulary synthesis: preempted the most recently started trajectory (slot %d) to free KV "
                 "pages; %d preemption(s) so far", slot, self.preemptions)
