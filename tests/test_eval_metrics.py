"""pass@k / avg@k / cons@k and the benchmark summary, checked against brute force and hand values."""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import combinations

import pytest

from motab_jax.eval.metrics import avg_at_k, majority_vote, pass_at_k, summarize


def _brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of the k-subsets of n samples (the first c correct) that contain a correct one."""
    subsets = list(combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_closed_form() -> None:
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(7, 7, 3) == 1.0
    for n in (1, 5, 16):
        assert pass_at_k(n, 0, 1) == 0.0
        assert pass_at_k(n, 0, n) == 0.0
        assert pass_at_k(n, 1, n) == 1.0
        assert pass_at_k(n, n, 1) == 1.0


def test_pass_at_k_matches_enumeration() -> None:
    for n in range(1, 10):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_brute_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable() -> None:
    # The binomials overflow floats here; the product form does not.
    value = pass_at_k(2000, 10, 100)
    assert 0.0 < value < 1.0
    assert value == pytest.approx(1 - math.comb(1990, 100) / math.comb(2000, 100), rel=1e-9)


@pytest.mark.parametrize("args", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1), (5.0, 2, 1), (5, True, 1)])
def test_pass_at_k_argument_errors(args: tuple) -> None:
    with pytest.raises(ValueError):
        pass_at_k(*args)


def test_avg_at_k() -> None:
    assert avg_at_k([True, False, True, True]) == 0.75
    assert avg_at_k([False]) == 0.0
    with pytest.raises(ValueError):
        avg_at_k([])


def test_majority_vote() -> None:
    assert majority_vote(["2", "3", "2"], [True, False, True]) is True
    assert majority_vote(["3", "2", "3"], [False, True, False]) is False
    # Whitespace is normalised: " 3 " and "3" are one answer with two votes.
    assert majority_vote([" 3 ", "2", "3"], [False, True, False]) is False
    # Ties go to the first answer seen.
    assert majority_vote(["7", "4", "8"], [False, True, False]) is False
    assert majority_vote(["4", "7", "7", "4"], [True, False, False, True]) is True
    assert majority_vote(["7", "4", "4", "7"], [False, True, True, False]) is False
    # None and empty answers do not vote, even when most frequent.
    assert majority_vote([None, None, "5", ""], [False, False, True, False]) is True
    assert majority_vote([None, None, "  "], [False, False, False]) is False
    assert majority_vote([], []) is False
    with pytest.raises(ValueError):
        majority_vote(["1"], [True, False])


def test_summarize_hand_computed() -> None:
    table = [
        {"correct": [True, False, True], "answers": ["2", "3", "2"]},   # acc 2/3, pass@2 1, cons 1
        {"correct": [False, False, False], "answers": ["5", None, " 5 "]},  # acc 0, cons 0
        {"correct": [False, True, False], "answers": ["7", "4", "8"]},  # acc 1/3, pass@2 2/3, cons 0 (tie -> "7")
    ]
    s = summarize(table)
    assert s["num_problems"] == 3 and s["samples_per_problem"] == 3
    assert s["avg@k"] == pytest.approx(1 / 3)
    assert s["avg@k_stderr"] == pytest.approx((1 / 3) / math.sqrt(3))
    assert s["pass@1"] == pytest.approx(1 / 3)
    assert s["pass@1_stderr"] == pytest.approx(s["avg@k_stderr"])
    assert s["pass@2"] == pytest.approx(5 / 9)
    assert s["pass@2_stderr"] == pytest.approx(math.sqrt(7) / 9)
    assert s["pass@3"] == pytest.approx(2 / 3)
    assert s["pass@3_stderr"] == pytest.approx(1 / 3)
    assert s["cons@3"] == pytest.approx(1 / 3)
    assert s["cons@3_stderr"] == pytest.approx(1 / 3)
    assert "pass@4" not in s


def test_summarize_single_problem_and_errors() -> None:
    s = summarize([{"correct": [True, False], "answers": ["1", "2"]}])
    assert s["avg@k"] == 0.5 and s["avg@k_stderr"] == 0.0
    assert s["pass@2"] == 1.0 and s["pass@2_stderr"] == 0.0
    assert s["cons@2"] == 1.0
    with pytest.raises(ValueError, match="no problems"):
        summarize([])
    with pytest.raises(ValueError, match="same number"):
        summarize([{"correct": [True], "answers": ["1"]}, {"correct": [True, False], "answers": ["1", "2"]}])
    with pytest.raises(ValueError, match="same number"):
        summarize([{"correct": [], "answers": []}])
    with pytest.raises(ValueError, match="answers"):
        summarize([{"correct": [True]}])
    with pytest.raises(ValueError, match="answers"):
        summarize([{"correct": [True, False], "answers": ["1"]}])
