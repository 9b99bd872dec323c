"""experiments/compare_policies.py's statistics against hand-computed values and scipy's paired t-test, its record
statistics on constructed records, and the demo's step checker."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from motab_jax.pipeline.demo_data import first_wrong_step

ROOT = Path(__file__).resolve().parents[1]


def load_compare_policies():
    """experiments/compare_policies.py as a module, loaded once per process (it defines absl flags, which may be
    defined only once)."""
    module = sys.modules.get("compare_policies")
    if module is None:
        spec = importlib.util.spec_from_file_location("compare_policies", ROOT / "experiments" / "compare_policies.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["compare_policies"] = module
    return module


@pytest.fixture(scope="module")
def compare():
    return load_compare_policies()


def test_paired_difference_by_hand(compare):
    # 2 seeds x 4 problems. d = [[1,0,0,1],[0,1,0,1]]: mean 0.5; per problem [.5,.5,0,1] (sample variance 1/6, so
    # the SE over problems is sqrt(1/6)/2 = sqrt(1/24)); per seed [.5,.5] (no spread).
    reference = [[1, 0, 1, 1], [1, 1, 0, 1]]
    baseline = [[0, 0, 1, 0], [1, 0, 0, 0]]
    pair = compare.paired_difference(reference, baseline)
    assert pair["mean"] == pytest.approx(0.5)
    assert pair["se_problems"] == pytest.approx(math.sqrt(1 / 24))
    assert pair["se_seeds"] == pytest.approx(0.0)
    assert pair["se"] == pytest.approx(math.sqrt(1 / 24))
    assert (pair["wins"], pair["losses"]) == (3, 0) and pair["per_seed"] == [0.5, 0.5]
    # d = [[1,1,1,1],[0,1,0,1]]: per seed [1, .5] -> SE |1 - .5| / sqrt(2) / sqrt(2) = 0.25; per problem
    # [.5,1,.5,1] -> sample variance .25/3, SE sqrt(.25/3)/2; combined sqrt(.25^2 + .25/12).
    pair = compare.paired_difference([[1, 1, 1, 1], [0, 1, 0, 1]], np.zeros((2, 4)))
    assert pair["mean"] == pytest.approx(0.75)
    assert pair["se_seeds"] == pytest.approx(0.25)
    assert pair["se_problems"] == pytest.approx(math.sqrt(0.25 / 3) / 2)
    assert pair["se"] == pytest.approx(math.sqrt(0.0625 + 0.25 / 12))


def test_paired_difference_is_scipys_paired_t_over_problems(compare):
    rng = np.random.default_rng(0)
    reference, baseline = rng.integers(0, 2, (1, 50)), rng.integers(0, 2, (1, 50))
    pair = compare.paired_difference(reference, baseline)
    t = stats.ttest_rel(reference[0], baseline[0]).statistic
    assert pair["mean"] / pair["se_problems"] == pytest.approx(t)
    assert pair["se_seeds"] is None and pair["se"] == pytest.approx(pair["se_problems"])
    with pytest.raises(ValueError, match="one shape"):
        compare.paired_difference(reference, baseline[:, :10])


def test_accuracy_statistics_by_hand(compare):
    acc = compare.accuracy_statistics([[1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 1, 0]])
    assert acc["mean"] == pytest.approx(6 / 12)
    assert acc["per_seed"] == pytest.approx([0.5, 0.75, 0.25])
    assert acc["se_seeds"] == pytest.approx(0.25 / math.sqrt(3))  # sample sd of (.5,.75,.25) is .25
    per_problem = np.array([2 / 3, 1 / 3, 1, 0])
    assert acc["se_problems"] == pytest.approx(per_problem.std(ddof=1) / 2)
    assert compare.accuracy_statistics([[1, 0]])["se_seeds"] is None


SOLUTION = "15 + 25 = 40.\n\n40 - 19 = 21.\n\n21 + 4 = 25.\n\nThe answer is \\boxed{25}."


def test_first_wrong_step_finds_the_slip_and_not_what_follows():
    assert first_wrong_step(SOLUTION, SOLUTION) is None
    assert first_wrong_step(SOLUTION, "15 + 25 = 40.\n\n40 - 19 = 31.\n\n31 + 4 = 35.\n\n") == 2
    assert first_wrong_step(SOLUTION, "15 + 25 = 30.\n\n") == 1
    assert first_wrong_step(SOLUTION, "15 + 25 = 40.\n\n40 - 1") is None  # cut inside a correct step
    assert first_wrong_step(SOLUTION, "15 + 25 = 40.\n\n40 - 1.\n\n") == 2  # a whole step that is not the reference
    assert first_wrong_step(SOLUTION, SOLUTION + "\n\nThe answer is 7.") == 5  # text after the answer


def _record(rid, response, breach=None, root=None, student=None, values=()):
    segments = [{"source": "student", "text": student if student is not None else response}]
    if breach:
        segments += [{"source": "revise", "text": "\n\nHowever,\n\n"}, {"source": "teacher", "text": "..."}]
    steps = [{"value": v, "eps": 0.4} for v in values]
    return {"id": rid, "response": response, "segments": segments, "breach_step": breach, "root_step": root,
            "steps": steps,
            "tokens": {"student": 10, "revise": 3 if breach else 0, "teacher": 5 if breach else 0}}


def test_synthesis_statistics_classify_breaches_against_the_first_wrong_step(compare):
    wrong2 = "15 + 25 = 40.\n\n40 - 19 = 31.\n\n31 + 4 = 35.\n\n"
    records = [
        _record("a", SOLUTION),  # clean
        _record("b", wrong2 + "The answer is \\boxed{35}.", values=(0.9, 0.7, 0.8, 0.9)),  # missed: no breach, e = 2
        _record("c", wrong2 + "However, ..." + SOLUTION, breach=3, root=2, student=wrong2,
                values=(0.9, 0.3, 0.2)),  # root found (t* = e = 2)
        _record("d", wrong2 + "However, ...", breach=2, root=2, student=wrong2[:29]),  # root found at t = t* = 2
        _record("e", SOLUTION, breach=1, root=1, student="15 + 25 = 40.\n\n"),  # false alarm: step 1 is right
        _record("f", wrong2, breach=3, root=3, student=wrong2, values=(0.95, 0.6, 0.3)),  # e = 2 < t* = 3: kept
    ]
    solutions = {k: SOLUTION for k in "abcdefg"}
    # motab_no_stitch / SKD step: the record keeps the safe prefix (step 1) and the teacher's text, no revise segment
    # and not the flawed step 2, whose V_T (0.2) must not count as a right step's.
    no_stitch = _record("g", SOLUTION, breach=2, root=2, student="15 + 25 = 40.\n\n", values=(0.9, 0.2))
    no_stitch["segments"] = [s for s in no_stitch["segments"] if s["source"] != "revise"]
    kept = compare.synthesis_statistics(records + [no_stitch], solutions)
    assert kept["student_errors"]["flawed_not_kept"] == 1 and kept["student_errors"]["false_alarm"] == 1
    assert kept["v_t_median"]["correct"] == pytest.approx(0.9)
    s = compare.synthesis_statistics(records, solutions)
    assert s["breached"] == 4 and s["breach_rate"] == pytest.approx(4 / 6)
    assert s["breach_step_hist"] == [0, 1, 1, 2] and s["breach_step_mean"] == pytest.approx(9 / 4)
    assert s["root_before_breach"] == pytest.approx(1 / 4) and s["depth_hist"] == [3, 1]
    assert s["student_errors"] == {"caught_root_found": 2, "caught_root_earlier": 0, "caught_root_later": 1,
                                   "false_alarm": 1, "missed": 1, "clean": 1, "flawed_not_kept": 0}
    assert s["records_correct"] == pytest.approx(2 / 6)  # a and e end in the reference solution
    assert s["tokens"] == {"student": 60, "revise": 12, "teacher": 20}
    # V_T before the slip (.9, .9, .95), at it (.7, .3, .6; only .3 under eps = .4) and after it (.8, .9, .2, .3).
    assert s["v_t_median"] == pytest.approx({"correct": 0.9, "slip": 0.6, "after": 0.55})
    assert s["slip_below_boundary"] == pytest.approx(1 / 3)
    assert compare.synthesis_statistics(records, solutions, judges_steps=False) == {
        "records": 6, "breached": None, "breach_rate": None, "tokens": s["tokens"], "records_correct": s["records_correct"]}
