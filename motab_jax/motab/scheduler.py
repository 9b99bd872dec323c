"""The host scheduler of the slot engine: a queue of jobs, B slots, and the pages of each KV page pool.

Plain Python (no JAX): the engine's host loop asks it, before each device loop, which slots to start and
commits its page tables. Rules:
- Top-up: every live slot gets pages for its context plus one sync of growth (`growth` tokens), oldest
  trajectory first; pages past that (after a rewind) go back to the pool.
- Admission: a queued job starts only when a slot is free and every pool has pages for its prompt plus one
  sync of growth; jobs start in queue order.
- Preemption: when a live slot cannot be topped up, the most recently started trajectory is stopped, its
  pages freed and its job put back at the head of the queue (its keys depend on the job, not on when it
  ran, so rerunning it gives the same result). Nothing is admitted in a plan that preempted.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Generic, Sequence, TypeVar

import numpy as np

from motab_jax.models.paged_cache import PageAllocator, PagePoolExhausted

log = logging.getLogger("motab_jax")

JobT = TypeVar("JobT")


@dataclasses.dataclass
class SlotPlan(Generic[JobT]):
    """What the host does on the device before the next loop."""

    started: list[tuple[int, JobT]]  # (slot, job) to start
    release: np.ndarray  # [B] bool: slots whose trajectory must stop (preempted)


class Scheduler(Generic[JobT]):
    def __init__(self, num_slots: int, pools: Sequence[PageAllocator], growth: int, max_len: int,
                 queue: collections.deque | None = None):
        """`pools`: one allocator per KV cache (every job needs pages in each); `growth`: tokens a slot may
        add in one device loop; `max_len`: the most positions a slot can address; `queue`: a queue shared with
        other schedulers (engine groups admit from one queue and requeue preempted jobs at its head)."""
        self.num_slots, self.pools, self.growth, self.max_len = num_slots, list(pools), growth, max_len
        # (job, prompt length)
        self.queue: collections.deque[tuple[JobT, int]] = queue if queue is not None else collections.deque()
        self.slots: list[tuple[JobT, int] | None] = [None] * num_slots
        self.started_at = np.zeros(num_slots, np.int64)  # start order of the slot's trajectory
        self._clock = 0
        self.preemptions = 0

    # ------------------------------------------------------------------ queue
    def submit(self, job: JobT, prompt_len: int) -> None:
        need = self._pages(min(prompt_len + self.growth, self.max_len))
        if need > min(p.num_pages - 1 for p in self.pools):
            raise MemoryError(f"a prompt of {prompt_len} tokens plus one sync of growth ({self.growth}) needs {need} "
                              f"pages but the pool has {min(p.num_pages for p in self.pools) - 1}")
        self.queue.append((job, prompt_len))

    @property
    def live(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None]

    @property
    def idle(self) -> bool:
        return not self.queue and not self.live

    def job(self, slot: int) -> JobT:
        entry = self.slots[slot]
        if entry is None:
            raise KeyError(f"slot {slot} holds no job")
        return entry[0]

    def finish(self, slot: int) -> JobT:
        """The slot's trajectory ended and its result was read: free its slot and pages."""
        job = self.job(slot)
        self._free(slot)
        return job

    # ------------------------------------------------------------------ planning
    def plan(self, ctx_len: Sequence[int]) -> SlotPlan[JobT]:
        """Top up live slots (preempting when the pools run dry), then admit queued jobs. `ctx_len` [B]: the
        context length of every slot after the last device loop."""
        release = np.zeros(self.num_slots, bool)
        for slot in sorted(self.live, key=lambda i: self.started_at[i]):
            while self.slots[slot] is not None:
                need = min(int(ctx_len[slot]) + self.growth, self.max_len)
                try:
                    self._reserve(slot, need)
                    break
                except PagePoolExhausted:
                    victim = max(self.live, key=lambda i: self.started_at[i])
                    if victim == slot and len(self.live) == 1:
                        raise MemoryError(
                            f"the KV page pools cannot hold one trajectory of {need} tokens "
                            f"({self._pages(need)} pages of {self.pools[0].page_size}; pools of "
                            f"{[p.num_pages - 1 for p in self.pools]} pages): raise num_pages / memory_budget_gb "
                            "or lower traj_cap") from None
                    self._preempt(victim)
                    release[victim] = True
        started: list[tuple[int, JobT]] = []
        # After a preemption the pools are under pressure: admitting now would only restart work to stop it again.
        free_slots = [] if release.any() else [i for i, s in enumerate(self.slots) if s is None]
        while self.queue and free_slots:
            job, prompt_len = self.queue[0]
            need = min(prompt_len + self.growth, self.max_len)
            if any(p.free_pages < self._pages(need) for p in self.pools):
                break
            self.queue.popleft()
            slot = free_slots.pop(0)
            self.slots[slot] = (job, prompt_len)
            self._clock += 1
            self.started_at[slot] = self._clock
            self._reserve(slot, need)
            started.append((slot, job))
        return SlotPlan(started, release)

    def tables(self) -> list[np.ndarray]:
        """The page table of each pool [B, pages_per_seq] (to commit to the device caches)."""
        return [p.table for p in self.pools]

    # ------------------------------------------------------------------ internals
    def _pages(self, tokens: int) -> int:
        return -(-tokens // self.pools[0].page_size)

    def _reserve(self, slot: int, tokens: int) -> None:
        """Give `slot` exactly the pages for `tokens` positions in every pool (all or nothing)."""
        if any(p.pages_needed(slot, tokens) > p.free_pages for p in self.pools):
            raise PagePoolExhausted(f"slot {slot} needs pages for {tokens} tokens")
        for p in self.pools:
            p.trim(slot, tokens)
            p.ensure(slot, tokens)

    def _free(self, slot: int) -> None:
        for p in self.pools:
            p.free(slot)
        self.slots[slot] = None

    def _preempt(self, slot: int) -> None:
        entry = self.slots[slot]
        assert entry is not None
        self._free(slot)
        self.queue.appendleft(entry)
        self.preemptions += 1
        log.info("engine: preempted the most recently started trajectory (slot %d) to free KV pages; %d "
                 "preemption(s) so far", slot, self.preemptions)
