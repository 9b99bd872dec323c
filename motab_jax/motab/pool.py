"""How big the engine's KV page pools are: one rule for the engine and the preflight.

A slot addresses `max_len` positions, but only the pages of its live tokens are held, so the pools are sized
by memory, not by slots x capacity:
- `num_pages` > 0: that many pages per pool;
- otherwise the budget is `memory_budget_gb` when set, else the devices' memory (on CPU a quarter of the host
  RAM, so a default run never takes the whole machine), less the weights and a margin for the loop's
  activations (`activation_margin`); the pools get the rest, never more than every slot at `max_len` needs.
Every trajectory holds the same positions in each model's pool, so the pools have the same page count and a
page costs the sum of the models' per-token KV bytes.

On a mesh with a `data` axis of size G the engine runs G groups (`models.sharding.SAMPLING_RULES`): each holds a
copy of the weights, num_slots / G slots (rounded up) and its own pools of `num_pages` pages; the budget pays for
G weight copies and is split evenly between the groups.

Refused (MemoryError with the arithmetic): a pool that cannot hold one trajectory at `max_len` plus every
other slot's prompt. Above that the engine runs; when the live tokens outgrow the pool it preempts the most
recently started trajectory and reruns it later (same result), so a small pool costs time, never records.
"""

from __future__ import annotations

import dataclasses
import os

import jax

GIB = 2**30
# Fraction of the budget kept free for XLA's workspace and fragmentation.
WORKSPACE_FRACTION = 0.05
HOST_FRACTION = 0.25  # on CPU, the share of host RAM the pools may take by default


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def min_pool_pages(max_len: int, max_prompt_len: int, slots: int, page_size: int) -> int:
    """The least pages a pool of `slots` slots may have: one trajectory at `max_len`, every other slot's prompt of
    `max_prompt_len`, and the null page (below it one trajectory could not finish even with the others preempted)."""
    return pages_for(max_len, page_size) + (slots - 1) * pages_for(max_prompt_len, page_size) + 1


def memory_over_devices(free: bool = False, local: bool = False) -> tuple[float, bool]:
    """(bytes, on accelerators): the accelerators' memory summed over devices (with `free`, less what is in use
    now, e.g. by a training state), or, on CPU, the host's RAM; 0 when unknown. `local`: over this process's
    devices only, those its engines run on (a multi-host job runs one engine per host, `pipeline.multihost`)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        per_device = stats["bytes_limit"] - (stats.get("bytes_in_use", 0) if free else 0)
        return float(per_device) * (jax.local_device_count() if local else jax.device_count()), True
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), False
    except (ValueError, OSError, AttributeError):
        return 0.0, False


def device_memory(free: bool = False) -> tuple[float, str]:
    """(bytes, what they are) the pools may be sized from by default: this process's accelerators' memory (see
    `memory_over_devices`), or on CPU a quarter of the host RAM."""
    total, accelerators = memory_over_devices(free, local=True)
    if accelerators:
        return total, f"{jax.local_device_count()} device(s)" + (" free" if free else "")
    return HOST_FRACTION * total, f"a quarter of the host RAM ({total / GIB:.1f} GiB)"


def weight_bytes(*models) -> float:
    """Bytes of the models' parameters (Decoders) as they are stored."""
    from flax import nnx

    return float(sum(x.size * x.dtype.itemsize for m in models for x in jax.tree.leaves(nnx.state(m, nnx.Param))))


def loaded_budget(weight_bytes: float, groups: int = 1) -> tuple[float, str]:
    """The memory a job whose weights (`weight_bytes` per copy, `groups` copies) are already on the devices may
    size its pools from: what is free now plus those weights (which `plan_pool` then takes off again); on CPU as
    `device_memory`."""
    total, what = device_memory(free=True)
    return (total + weight_bytes * groups if memory_over_devices()[1] else total), what


def activation_margin(num_slots: int, tokens_per_iteration: int, vocab: int) -> float:
    """The loop's largest transient buffers: float32 [slots, k+1, V] teacher logits and the few same-shaped
    arrays derived from them (log-softmax, the sampling distributions, the draft distributions)."""
    return 4.0 * num_slots * tokens_per_iteration * vocab * 4


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    num_slots: int  # over all groups (a multiple of `groups`)
    page_size: int
    max_len: int  # positions one slot addresses
    max_prompt_len: int
    token_bytes: int  # KV bytes of one position over all pools
    num_pages: int  # pages per pool of one group, the null page included
    budget_bytes: float  # what the pools were sized from (0 when num_pages was given)
    source: str  # where the budget came from
    groups: int = 1  # engine groups (the mesh's data axis), each with its own slots and pools

    @property
    def slots_per_group(self) -> int:
        return self.num_slots // self.groups

    @property
    def pages_per_seq(self) -> int:
        return pages_for(self.max_len, self.page_size)

    @property
    def min_pages(self) -> int:
        """Per group: one trajectory at max_len, every other slot's prompt, and the null page."""
        return min_pool_pages(self.max_len, self.max_prompt_len, self.slots_per_group, self.page_size)

    @property
    def pool_bytes(self) -> float:
        """Bytes of the pools of all groups."""
        return float(self.groups * self.num_pages * self.page_size * self.token_bytes)

    @property
    def mean_live_tokens(self) -> float:
        """Live tokens per slot the pools hold when every slot is busy; past it the engine preempts."""
        return (self.num_pages - 1) * self.page_size / self.slots_per_group

    def _groups_text(self) -> str:
        return f" in each of {self.groups} engine groups" if self.groups > 1 else ""

    def describe(self) -> str:
        return (f"KV page pools: {self.num_pages} pages{self._groups_text()} x {self.page_size} positions x "
                f"{self.token_bytes} B = {self.pool_bytes / GIB:.2f} GiB ({self.source}); {self.mean_live_tokens:.0f} "
                f"live tokens per slot with all {self.num_slots} slots busy (a slot addresses {self.max_len})")

    def check(self) -> None:
        if self.num_pages < self.min_pages:
            raise MemoryError(
                f"the KV page pools hold {self.num_pages} pages{self._groups_text()} of {self.page_size} positions "
                f"({self.pool_bytes / GIB:.3f} GiB, {self.source}) but need at least {self.min_pages}: one trajectory "
                f"of {self.max_len} positions ({self.pages_per_seq} pages) + {self.slots_per_group - 1} other slots' "
                "prompts "
                f"of {self.max_prompt_len} ({pages_for(self.max_prompt_len, self.page_size)} pages each) + the null "
                f"page = {self.min_pages} pages x {self.page_size} x {self.token_bytes} B = "
                f"{self.min_pages * self.page_size * self.token_bytes / GIB:.3f} GiB; raise memory_budget_gb or "
                "num_pages, or lower num_slots, traj_cap or max_prompt_len")


def plan_pool(*, num_slots: int, page_size: int, max_len: int, max_prompt_len: int, token_bytes: int,
              num_pages: int = 0, memory_budget_gb: float = 0.0, weight_bytes: float = 0.0,
              margin_bytes: float = 0.0, device_bytes: tuple[float, str] | None = None, groups: int = 1) -> PoolPlan:
    """The pools for `num_slots` slots of `max_len` positions over `groups` engine groups (see the module
    docstring for the rule); `weight_bytes`: one copy of the weights."""
    if groups < 1:
        raise ValueError(f"groups={groups}: the mesh's data axis must be >= 1")
    num_slots = -(-num_slots // groups) * groups  # every group gets the same number of slots
    full = num_slots // groups * pages_for(max_len, page_size) + 1
    if num_pages:
        budget, source = 0.0, f"num_pages={num_pages}"
    else:
        if memory_budget_gb:
            total, what = memory_budget_gb * GIB, f"memory_budget_gb={memory_budget_gb:g}"
        else:
            total, what = device_bytes if device_bytes is not None else device_memory()
        budget = total * (1 - WORKSPACE_FRACTION) - weight_bytes * groups - margin_bytes
        copies = f"{groups} x " if groups > 1 else ""
        source = (f"{what} less weights {copies}{weight_bytes / GIB:.2f} GiB, activations {margin_bytes / GIB:.2f} GiB "
                  f"and {WORKSPACE_FRACTION:.0%} workspace")
        num_pages = min(full, max(int(budget / groups // (page_size * token_bytes)), 0))
    return PoolPlan(num_slots, page_size, max_len, max_prompt_len, token_bytes, num_pages, budget, source, groups)
