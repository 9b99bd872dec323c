"""The host scheduler (plain Python) and the speculative acceptance function, each on its own."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from motab_jax.models.paged_cache import PageAllocator
from motab_jax.motab.acceptance import accept_drafts
from motab_jax.motab.pool import plan_pool
from motab_jax.motab.scheduler import Scheduler
from test_sampling import _chi_square_pvalue


def _scheduler(pages: int, slots: int = 3, growth: int = 8, max_len: int = 64, pools: int = 1) -> Scheduler:
    return Scheduler(slots, [PageAllocator(pages, 4, slots, max_len // 4) for _ in range(pools)], growth, max_len)


def _held(s: Scheduler) -> list[int]:
    return [int(x) for x in s.pools[0].held]


def test_admission_needs_a_free_slot_and_pages_for_prompt_plus_growth():
    s = _scheduler(pages=11)  # 10 usable pages of 4 tokens
    for job in "abcd":
        s.submit(job, 8)  # prompt 8 + growth 8 = 16 tokens = 4 pages each
    plan = s.plan(np.zeros(3))
    assert [job for _, job in plan.started] == ["a", "b"]  # the third would need 4 of the 2 pages left
    assert _held(s) == [4, 4, 0] and s.pools[0].free_pages == 2
    assert list(s.queue) == [("c", 8), ("d", 8)]


def test_top_up_follows_the_context_and_trims_after_a_rewind():
    s = _scheduler(pages=30, slots=2)
    s.submit("a", 4)
    s.plan(np.zeros(2))
    assert _held(s)[0] == 3  # 4 + 8 tokens
    s.plan(np.asarray([30, 0]))
    assert _held(s)[0] == 10  # 38 tokens
    s.plan(np.asarray([9, 0]))  # the context was rewound (a breach)
    assert _held(s)[0] == 5 and s.pools[0].free_pages == 29 - 5
    s.plan(np.asarray([60, 0]))
    assert _held(s)[0] == 16  # capped at max_len


def test_engine_groups_admit_from_one_queue_and_a_preempted_job_may_restart_in_another_group():
    queue = collections.deque()
    groups = [Scheduler(2, [PageAllocator(9, 4, 2, 16)], 8, 64, queue=queue) for _ in range(2)]  # 8 pages each
    for job in "abcde":
        groups[0].submit(job, 4)  # 3 pages at admission
    started = [[job for _, job in g.plan(np.zeros(2)).started] for g in groups]
    assert started == [["a", "b"], ["c", "d"]] and list(queue) == [("e", 4)]
    # Group 0's trajectories grew past its pool: b (its newest) is preempted and requeued at the shared head; group
    # 1 has room and admits nothing new until a slot frees (both of its slots are busy).
    plan = groups[0].plan(np.asarray([16, 16]))
    assert plan.release.tolist() == [False, True] and list(queue) == [("b", 4), ("e", 4)]
    groups[1].finish(0)
    assert [job for _, job in groups[1].plan(np.asarray([0, 4])).started] == ["b"]
    assert list(queue) == [("e", 4)] and groups[0].preemptions == 1 and groups[1].preemptions == 0


def test_dry_pool_preempts_the_newest_trajectory_and_requeues_it_first():
    s = _scheduler(pages=13, slots=3)  # 12 usable pages
    for job in "abcd":
        s.submit(job, 4)  # 3 pages each at admission
    first = s.plan(np.zeros(3))
    assert [job for _, job in first.started] == ["a", "b", "c"]
    plan = s.plan(np.asarray([16, 16, 16]))  # everyone grew: each wants 6 pages, 18 > 12
    # a and b (oldest first) get their pages; c, the newest, is stopped and goes back to the head of the queue.
    assert s.preemptions == 1 and plan.release.tolist() == [False, False, True] and plan.started == []
    assert list(s.queue) == [("c", 4), ("d", 4)] and _held(s) == [6, 6, 0]
    plan = s.plan(np.asarray([20, 40, 0]))  # b grows past what is left: b is now the newest live one
    assert s.preemptions == 2 and plan.release.tolist() == [False, True, False]
    assert list(s.queue)[:3] == [("b", 4), ("c", 4), ("d", 4)] and _held(s) == [7, 0, 0]


def test_pages_of_a_finished_job_return_and_the_last_trajectory_never_starves_silently():
    s = _scheduler(pages=9, slots=2, pools=2)
    s.submit("a", 4)
    s.plan(np.zeros(2))
    assert all(p.free_pages == 5 for p in s.pools)  # both pools hold the same positions
    assert s.finish(0) == "a" and all(p.free_pages == 8 for p in s.pools) and s.idle
    s.submit("b", 4)
    s.plan(np.zeros(2))
    with pytest.raises(MemoryError, match="cannot hold one trajectory"):
        s.plan(np.asarray([40, 0]))
    with pytest.raises(MemoryError, match="needs 11 pages but the pool has 8"):
        _scheduler(pages=9, max_len=64, growth=40).submit("c", 4)


def test_pool_plan_refuses_less_than_one_trajectory_plus_the_prompts():
    plan = plan_pool(num_slots=4, page_size=16, max_len=1000, max_prompt_len=100, token_bytes=1024, num_pages=80)
    assert plan.min_pages == 63 + 3 * 7 + 1
    with pytest.raises(MemoryError, match=r"need at least 85: one trajectory of 1000 positions \(63 pages\)"):
        plan.check()
    auto = plan_pool(num_slots=4, page_size=16, max_len=1000, max_prompt_len=100, token_bytes=1024,
                     memory_budget_gb=1.0, weight_bytes=0.5 * 2**30)
    assert auto.num_pages == 4 * 63 + 1  # never more than every slot at max_len
    small = plan_pool(num_slots=4, page_size=16, max_len=1000, max_prompt_len=100, token_bytes=1024,
                      memory_budget_gb=1.0, weight_bytes=2**30 - 100 * 16 * 1024)
    assert small.num_pages < 100


# ----------------------------------------------------------------------------------- speculative acceptance
def test_equal_distributions_accept_every_draft_and_add_the_bonus_token():
    p = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, 3, 7)))
    drafts = jnp.asarray([[1, 2, 3], [4, 5, 6]])
    accepted, token = accept_drafts(drafts, p, p, jnp.full((2, 3), 0.999), jax.random.split(jax.random.key(1), 2),
                                    jnp.asarray([5, 6]))
    assert accepted.tolist() == [3, 3] and token.tolist() == [5, 6]


def test_a_draft_the_target_cannot_produce_is_rejected_and_resampled_from_the_residual():
    p = jnp.zeros((1, 2, 4)).at[0, :, 2].set(1.0)  # the target only ever says 2
    accepted, token = accept_drafts(jnp.asarray([[1, 2]]), p, None, jnp.full((1, 2), 0.5),
                                    jax.random.split(jax.random.key(0), 1), jnp.asarray([0]))
    assert accepted.tolist() == [0] and token.tolist() == [2]


def test_committed_tokens_follow_the_target_distribution():
    """First committed token: d_1 if accepted, else the residual sample; it must be distributed as p_1."""
    vocab, n = 6, 20000
    rng = np.random.default_rng(0)
    p1, q1 = rng.dirichlet(np.ones(vocab)), rng.dirichlet(np.ones(vocab))
    p = jnp.broadcast_to(jnp.asarray(p1, jnp.float32), (n, 1, vocab))
    q = jnp.broadcast_to(jnp.asarray(q1, jnp.float32), (n, 1, vocab))
    keys = jax.random.split(jax.random.key(3), 3)
    drafts = jax.random.categorical(keys[0], jnp.log(q[:, 0]))[:, None]
    uniforms = jax.random.uniform(keys[1], (n, 1))
    accepted, token = accept_drafts(drafts, p, q, uniforms, jax.random.split(keys[2], n), jnp.zeros((n,), jnp.int32))
    first = np.where(np.asarray(accepted) >= 1, np.asarray(drafts[:, 0]), np.asarray(token))
    assert _chi_square_pvalue(np.bincount(first, minlength=vocab), p1) > 1e-3
    assert 0 < float(np.mean(np.asarray(accepted))) < 1  # both branches were exercised
