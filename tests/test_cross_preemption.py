"""Admission by free pages and preemption on the text-level (cross-vocabulary) path (`motab.cross_pages`), the
bookkeeping on its own. The engine with a pool so small that trajectories are preempted (the records of a roomy
pool) is in tests/test_cross_vocabulary.py, which loads the tokenizer pair once for all its tests."""

from __future__ import annotations

import pytest

from motab_jax.motab.cross_pages import GroupPages, SlotBook


def _book(num_pages: int, groups: int = 1, per_group: int = 3, finished=lambda slot: False):
    """Two pools of `num_pages` pages of 4 positions, slots of 8 pages; jobs a..e."""
    pools = {name: GroupPages(groups, per_group, 8, 4, num_pages) for name in ("student", "teacher")}
    dropped: list[int] = []
    book = SlotBook(pools, list("abcde"), dropped.append, finished)
    return book, pools, dropped


def test_a_dry_pool_preempts_the_newest_trajectory_freeing_both_pools_and_requeueing_it_first():
    book, pools, dropped = _book(num_pages=11)  # 10 usable pages per pool
    started = book.admit(lambda job: {"student": 8, "teacher": 8})  # 2 pages in each pool each
    assert started == [(0, "a"), (1, "b"), (2, "c")] and list(book.queue) == ["d", "e"]
    assert pools["student"].allocators[0].free_pages == 4 and pools["teacher"].allocators[0].free_pages == 4
    # The teacher's pool runs dry for the oldest trajectory: the newest (c, slot 2) goes, from both pools.
    assert book.reserve("teacher", {0: 28, 1: 4}) == [2]
    assert dropped == [2] and list(book.queue) == ["c", "d", "e"] and book.preemptions == 1
    assert pools["student"].held(2) == 0 and pools["teacher"].held(2) == 0
    assert pools["teacher"].held(0) == 7 and pools["teacher"].held(1) == 2
    # A group that preempted admits nothing in the next admission round; then c starts first.
    assert book.admit(lambda job: {"student": 4, "teacher": 4}) == []
    assert book.admit(lambda job: {"student": 4, "teacher": 4}) == [(2, "c")]
    # A victim among the call's own later rows is skipped there (regression: it was looked up after its preemption).
    assert book.reserve("teacher", {0: 32, 2: 8}) == [2] and pools["teacher"].held(2) == 0
    assert pools["teacher"].held(0) == 8 and book.preemptions == 2
    assert book.finish(1) == "b"  # its 2 teacher pages go back
    assert book.admit(lambda job: {"student": 4, "teacher": 4}) == []  # the round after a preemption
    assert book.admit(lambda job: {"student": 4, "teacher": 4}) == [(1, "c"), (2, "d")]
    # Newest first, down to the reserving slot itself when it is the newest left: d, then c; requeued in order.
    assert book.reserve("teacher", {1: 32}) == [2, 1] and book.preemptions == 4
    assert list(book.queue) == ["c", "d", "e"] and book.live(0) and not book.live(1)


def test_finished_trajectories_give_their_pages_back_before_anything_is_preempted():
    done: set[int] = set()
    book, pools, dropped = _book(num_pages=17, finished=lambda slot: slot in done)
    book.admit(lambda job: {"student": 16, "teacher": 16})  # 4 pages each: 12 of 16 taken
    book.reserve("student", {0: 32})  # slot 0 takes the last 4
    done.add(2)  # slot 2 ended; its record is read at the end of the round
    assert book.reserve("student", {1: 32}) == [] and dropped == []
    assert pools["student"].held(2) == 0 and pools["teacher"].held(2) == 0 and book.live(2)
    # A context past a slot's capacity is an error before anything is preempted for it.
    with pytest.raises(ValueError, match="exceed the student's cache of 32"):
        book.reserve("student", {0: 33})
    assert book.preemptions == 0 and book.finish(2) == "c" and not book.live(2)


def test_engine_groups_have_their_own_pools_and_admit_from_one_queue():
    book, pools, _ = _book(num_pages=9, groups=2, per_group=2)
    # Free slots are taken group by group in turn: local slot 0 of both groups, then local slot 1.
    assert book.admit(lambda job: {"student": 12, "teacher": 4}) == [(0, "a"), (2, "b"), (1, "c"), (3, "d")]
    # Group 0's pool runs dry: its newest (c) is preempted; group 1 is untouched.
    assert book.reserve("student", {0: 32}) == [1] and list(book.queue) == ["c", "e"]
    assert [pools["student"].held(i) for i in range(4)] == [8, 0, 3, 3]
    # Group 0 preempted: only group 1 could admit, and it has no free slot.
    assert book.admit(lambda job: {"student": 4, "teacher": 4}) == []


def test_a_pool_below_one_trajectory_at_full_capacity_is_refused_naming_the_knob():
    with pytest.raises(MemoryError, match="raise synthesis.num_pages or memory_budget_gb"):
        GroupPages(1, 3, 8, 4, num_pages=8)  # 8 pages per slot + the null page is the least
    GroupPages(1, 3, 8, 4, num_pages=9)
