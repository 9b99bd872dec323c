"""pass@k / avg@k / cons@k and the benchmark summary, checked against brute force and hand values."""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import combinations

import pytest

from motab_jax.eval.metrics import avg_at_k, length_summary, length_table, majority_vote, pass_at_k, summarize
from motab_jax.pipeline.summary import final_summary, results_entry


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


# ----------------------------------------------------------------------------- truncation and lengths
def _sample(num_tokens: int, correct: bool, max_new_tokens: int = 1000) -> dict:
    """A per-sample record as the harness writes it: "length" when the budget ran out."""
    return {"num_tokens": num_tokens, "correct": correct,
            "finish_reason": "length" if num_tokens == max_new_tokens else "stop"}


def test_length_summary_closed_form() -> None:
    # Two problems x 5 samples, budget 1000 tokens: three samples hit it, one of them graded correct anyway.
    samples = [_sample(1000, True), _sample(100, True), _sample(200, False), _sample(300, True), _sample(1000, False),
               _sample(400, True), _sample(500, False), _sample(600, True), _sample(700, False), _sample(1000, False)]
    s = length_summary(samples)
    assert (s["samples"], s["truncated"], s["truncated_correct"]) == (10, 3, 1)
    assert s["truncated_fraction"] == pytest.approx(3 / 10)
    assert s["length_mean"] == pytest.approx((100 + 200 + 300 + 400 + 500 + 600 + 700 + 3 * 1000) / 10)  # 580
    # Sorted: 100 ... 700, 1000, 1000, 1000; p50 at rank 0.5 * 9 = 4.5, p90 at rank 0.9 * 9 = 8.1.
    assert s["length_p50"] == pytest.approx(500 + 0.5 * (600 - 500))
    assert s["length_p90"] == pytest.approx(1000.0)
    assert s["accuracy_truncated_as_wrong"] == pytest.approx(4 / 10)
    assert s["accuracy_not_truncated"] == pytest.approx(4 / 7)
    # The graded accuracy (avg@k) still counts the truncated sample that boxed the right answer.
    per_problem = [{"correct": [x["correct"] for x in samples[i:i + 5]], "answers": ["1"] * 5} for i in (0, 5)]
    assert summarize(per_problem)["avg@k"] == pytest.approx(5 / 10)


def test_length_summary_percentiles_interpolate() -> None:
    s = length_summary([_sample(n, False) for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)])
    assert (s["length_mean"], s["length_p50"], s["length_p90"]) == pytest.approx((5.5, 5.5, 9.1))
    assert s["truncated"] == 0 and s["accuracy_not_truncated"] == 0.0


def test_length_summary_edge_cases() -> None:
    s = length_summary([_sample(1000, True), _sample(1000, False)])
    assert s["truncated_fraction"] == 1.0 and s["accuracy_not_truncated"] is None
    assert s["accuracy_truncated_as_wrong"] == 0.0 and s["truncated_correct"] == 1
    assert length_summary([{"num_tokens": 3, "finish_reason": "stop", "strict": True}],
                          correct_key="strict")["accuracy_not_truncated"] == 1.0
    with pytest.raises(ValueError, match="no samples"):
        length_summary([])
    with pytest.raises(ValueError, match=r"sample 1 has no \['finish_reason'\]"):
        length_summary([_sample(5, True), {"num_tokens": 5, "correct": True}])


def test_length_table() -> None:
    samples = [_sample(1000, True), _sample(100, True), _sample(200, False), _sample(300, True)]
    table = length_table({"aime24": length_summary(samples), "old": {"avg@k": 0.5}}).splitlines()
    assert table[2] == "| aime24 | 25.00 | 400.0 | 250.0 | 790.0 | 50.00 | 66.67 |"
    assert table[3] == "| old | - | - | - | - | - | - |"


def test_results_md_reports_truncation_and_lengths() -> None:
    samples = [_sample(1000, True), _sample(100, True), _sample(200, False), _sample(300, True)]
    summary = {**summarize([{"correct": [x["correct"] for x in samples], "answers": ["1"] * 4}]),
               **length_summary(samples)}
    evaluation = {"teacher": {"aime24": results_entry(summary), "math500": 0.25},  # an older stage's plain number
                  "seconds": 12.0}
    text = final_summary({"eval": evaluation}, wall_seconds=1.0)
    assert "| teacher | 75.0 | 25.0 |" in text
    lengths = text.split("## Truncation and lengths")[1]
    assert "| teacher | aime24 | 25.0% | 400 / 250 / 790 | 50.0% | 66.7% |" in lengths
    assert "## Truncation and lengths" not in final_summary({"eval": {"teacher": {"math500": 0.25}}}, 1.0)
