"""Graders (math-verify, GSM8K numbers, A-D letters) and the process pool on adversarial input."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from motab_jax.eval.grading import (
    LOOP_MAX_UNIT_CHARS, LOOP_WINDOW_CHARS, MAX_ANCHORED_ANSWER_CHARS, MAX_COMPLETION_CHARS, GradingPool,
    anchored_answer, ends_in_loop, extract_choice_letter, extract_last_number, extracted_answer, grade, grade_choice,
    grade_gsm8k, grade_math, grade_one, last_boxed_content, strip_thinking)

MATH_CASES = [  # (completion, gold, equivalent)
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"So the answer is $\boxed{\frac12}$.", "0.5", True),
    ("The answer is 1/2", "1/2", True),
    (r"\boxed{\dfrac{1}{2}}", "1/2", True),
    (r"\boxed{0.333}", "1/3", False),
    (r"\boxed{3.0}", "3", True),
    (r"\boxed{5 \text{ cm}}", "5", True),
    (r"\boxed{5}", r"5\text{ cm}", True),
    (r"\boxed{5\text{cm}}", "5 cm", True),
    (r"\boxed{-3}", "-3", True),
    (r"\boxed{3}", "-3", False),
    (r"First \boxed{1}, and finally \boxed{2}", "2", True),
    (r"First \boxed{1}, and finally \boxed{2}", "1", False),
    (r"\boxed{3}, or \boxed{4}", "3", False),  # hedging: only the last box counts
    (r"\boxed{\dfrac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}", True),
    (r"\boxed{\sqrt{3}/2}", r"\frac{\sqrt{3}}{2}", True),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", True),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{\sqrt{3}}", r"\frac{\sqrt{3}}{2}", False),
    (r"\boxed{(-\infty, 2]}", r"(-\infty, 2]", True),
    (r"\boxed{(-\infty, 2)}", r"(-\infty, 2]", False),
    (r"\boxed{\{1,2\}}", r"\{2,1\}", True),
    (r"\boxed{(1,2)}", "(1,2)", True),
    (r"\boxed{(2,1)}", "(1,2)", False),
    (r"<think>maybe \boxed{7}</think> so \boxed{8}", "8", True),
    (r"<think>it is \boxed{8}</think> so \boxed{7}", "8", False),
    (r"\boxed{x = 3}", "3", True),
    (r"\boxed{\pi/2}", r"\frac{\pi}{2}", True),
    (r"\boxed{1,000}", "1000", True),
    (r"$\boxed{x^2+2x+1}$", "(x+1)^2", True),
    (r"\boxed{2}", r"\boxed{2}", True),
    (r"\boxed{2}", "$2$", True),
    (r"The final answer is $\frac{3}{4}$", "0.75", True),
    ("no answer here", "2", False),
    ("", "2", False),
    (r"\boxed{}", "2", False),
]


@pytest.mark.parametrize("completion,gold,expected", MATH_CASES)
def test_grade_math_table(completion: str, gold: str, expected: bool) -> None:
    assert grade_math(completion, gold) is expected


def test_math_helpers() -> None:
    assert strip_thinking("a</think>b</think> c") == " c" and strip_thinking("abc") == "abc"
    assert last_boxed_content(r"\boxed{1} x \boxed{\frac{a}{b}} y") == r"\frac{a}{b}"
    assert last_boxed_content(r"\boxed{3} \boxed{2") is None  # cut off: no answer, not the earlier box
    assert not grade_math(r"\boxed{3} then \boxed{2", "3") and extracted_answer("math", r"\boxed{3} \boxed{2") is None
    assert last_boxed_content(r"see \boxed then \fbox{ 4 }") == "4"
    assert extracted_answer("math", r"<think>\boxed{9}</think>\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extracted_answer("math", "The answer is 1/2") == "1/2"
    assert extracted_answer("math", "nothing") is None
    # Sanitised input still grades: NUL bytes dropped, lone surrogates replaced.
    assert grade_math("\udcff\x00\\boxed{1}\ud800", "1")
    assert grade_math(b"\xff\\boxed{1}".decode("utf-8", "surrogateescape"), "1")
    # The answer is looked for in the last MAX_COMPLETION_CHARS characters only.
    assert grade_math(r"\boxed{1}" + "." * MAX_COMPLETION_CHARS, "1") is False
    with pytest.raises(ValueError):
        extracted_answer("essay", "x")


@pytest.mark.parametrize("text,number", [
    ("The total is $1,234.", "1234"), ("so 18.00 dollars", "18"), ("It is -5 degrees", "-5"),
    ("pages 10-12", "12"), (r"\boxed{\$18} and then 5 more", "18"), (r"\boxed{18 \text{ dollars}}.", "18"),
    ("x = .5", "0.5"), ("1,000,000 grains", "1000000"), ("no numbers", None), ("007", "7")])
def test_extract_last_number(text: str, number: str | None) -> None:
    assert extract_last_number(text) == number


def test_grade_gsm8k() -> None:
    assert grade_gsm8k("She pays $1,234.", "1234")
    assert grade_gsm8k("<think>maybe 5</think>The answer is 18.0000001", "Janet ... #### 18")
    assert not grade_gsm8k("The answer is 18.001", "18")
    assert not grade_gsm8k("<think>it is 7</think>so 8", "7")
    assert grade_gsm8k(r"\boxed{72} because 3 + 4", "72")
    assert not grade_gsm8k("no idea", "7")
    assert extracted_answer("gsm8k", "so 1,500.00") == "1500"


@pytest.mark.parametrize("text,letter", [
    ("Answer: C", "C"), (r"\boxed{C}", "C"), (r"\boxed{\text{(B)}}", "B"), ("The answer is **D**", "D"),
    ("(A) is wrong, (D) is right", "D"), ("A car goes... so the answer is B.", "B"), (r"\boxed{42} Answer: A", "A"),
    ("Between A and B, I pick C", "C"), ("Answer:C", "C"), ("nothing here", None)])
def test_extract_choice_letter(text: str, letter: str | None) -> None:
    assert extract_choice_letter(text) == letter


def test_grade_choice() -> None:
    assert grade_choice("Answer: C", "C") and grade_choice("Answer: C", "(C)") and grade_choice("Answer: C", "c")
    assert not grade_choice("Answer: C", "B")
    assert not grade_choice("<think>Answer: B</think>", "B")  # nothing after the thinking
    assert not grade_choice("nothing", "A")


# ----------------------------------------------------------------------------- pool
# \boxed{9^{9^{9^{9^{9}}}}} and \boxed{(10^{10})!} make math-verify's verify run for minutes
# (sympy evaluation in C loops); everything else here is fast thanks to the length/depth caps.
HANG = r"\boxed{9^{9^{9^{9^{9}}}}}"
PATHOLOGICAL = [
    ("math", HANG), ("math", r"\boxed{(10^{10})!}"),
    ("math", "\\boxed{" + "{" * 10**5 + "1" + "}" * 10**5 + "}"),
    ("math", "\\boxed{" + "{" * 4000 + "1" + "}" * 4000 + "}"),
    ("math", "\\boxed{" + "\\frac{1}{" * 90 + "2" + "}" * 90 + "}"),
    ("math", "\\boxed{" + "1" * 10**6 + "}"), ("math", "x" * 10**6), ("gsm8k", "9" * 10**6),
    ("choice", "(" * 10**6), ("math", "\\boxed{" * 3000),
    ("math", "\udcff\\boxed{2}\ud800"), ("math", b"\xff\xfe \\boxed{2} \xc3".decode("utf-8", "surrogateescape")),
    ("math", "\x00" * 1000 + "\\boxed{2}\x00"), ("gsm8k", "\udcff\x00"), ("choice", "\udcff\x00 E"),
]
NORMAL = [("math", r"\boxed{0.5}", r"\frac12"), ("math", r"\boxed{3}", "4"), ("gsm8k", "so $1,234.", "#### 1234"),
          ("choice", "Answer: C", "C"), ("choice", "Answer: C", "D"), ("math", "The answer is 1/2", "1/2")]


def _pids(pool: GradingPool) -> set[int]:
    return {w.proc.pid for w in pool._workers}


def test_pool_matches_direct_and_recycles() -> None:
    items = NORMAL + [(k, c, g) for c, g, _ in MATH_CASES for k in ("math",)]
    with GradingPool(num_workers=2, max_tasks_per_worker=25) as pool:
        first = pool.grade(items)
        pids = _pids(pool)
        second = pool.grade(items)  # the pool is reusable; 2 x 42 items > 2 x 25 forces recycling
        assert pids - _pids(pool)
    for results in (first, second):
        for item, res in zip(items, results):
            direct = grade_one(*item)
            assert (res.correct, res.extracted, res.timed_out, res.error) == (direct.correct, direct.extracted,
                                                                             False, None), item
    assert pool._workers == []
    with pytest.raises(RuntimeError):
        pool.grade(NORMAL)
    pool.close()  # idempotent


def test_pool_pathological_inputs() -> None:
    # Bound: each item costs at most item_timeout plus a worker respawn (~1-3 s), so 15 items on 2
    # workers take < 8 * (2 + 3) = 40 s even if all hung; only the two HANG-like items actually do.
    items = [(kind, text, "7") for kind, text in PATHOLOGICAL]
    start = time.monotonic()
    with GradingPool(num_workers=2, item_timeout=2.0) as pool:
        results = pool.grade(items)
        assert [r.correct for r in pool.grade(NORMAL)] == [grade_one(*i).correct for i in NORMAL]
    elapsed = time.monotonic() - start
    assert elapsed < 60, elapsed
    assert len(results) == len(items) and not any(r.correct for r in results)
    assert results[0].timed_out and results[1].timed_out
    assert all(r.error is None for r in results if not r.timed_out), results


def test_pool_timeout_deadline_and_crash() -> None:
    with GradingPool(num_workers=2, item_timeout=1.0) as pool:
        start = time.monotonic()
        results = pool.grade([("math", HANG, "1"), ("math", r"\boxed{2}", "2")])
        assert time.monotonic() - start < 30
        assert results[0].timed_out and not results[0].correct and "timed out" in results[0].error
        assert results[1].correct and not results[1].timed_out

        # The deadline cuts the whole batch: both workers hang, the rest never starts.
        pool.item_timeout = 60.0
        start = time.monotonic()
        results = pool.grade([("math", HANG, "1")] * 2 + NORMAL, deadline=1.5)
        assert time.monotonic() - start < 1.5 + 10
        assert all(r.timed_out and not r.correct for r in results)
        assert all(r.error == "batch deadline exceeded" for r in results)
        assert pool.grade(NORMAL, deadline=0.0)[0].timed_out

        # A worker killed between calls is replaced; its next item is retried elsewhere.
        pool.item_timeout = 5.0
        assert pool.grade(NORMAL)[0].correct
        victim = pool._workers[0].proc
        victim.kill()
        victim.join()
        assert [r.correct for r in pool.grade(NORMAL)] == [grade_one(*i).correct for i in NORMAL]
        assert victim.pid not in _pids(pool)

        # A worker killed while grading: that item is retried once, then reported; the call returns.
        pool.item_timeout = 2.0
        timer = threading.Timer(1.0, lambda: [w.proc.kill() for w in list(pool._workers)])
        timer.start()
        results = pool.grade([("math", HANG, "1"), ("math", r"\boxed{2}", "2")])
        timer.join()
        assert not results[0].correct and (results[0].timed_out or "crashed" in results[0].error)
        assert results[1].correct
        assert [r.correct for r in pool.grade(NORMAL)] == [grade_one(*i).correct for i in NORMAL]


def test_pool_rejects_unknown_kind() -> None:
    with GradingPool(num_workers=1) as pool:
        with pytest.raises(ValueError, match="unknown grading kind"):
            pool.grade([("essay", "x", "y")])
        assert pool._workers == []  # checked before any worker was started
    with pytest.raises(ValueError):
        GradingPool(num_workers=0)


# ----------------------------------------------------------------------------- public graders are bounded
PUBLIC = {"math": grade_math, "gsm8k": grade_gsm8k, "choice": grade_choice}


def test_public_graders_return_within_their_timeout_on_pathological_inputs() -> None:
    grade("math", r"\boxed{2}", "2")  # the shared worker is up: what follows times grading, not its start-up
    # The report: this call did not return within 90 s before the public graders had a timeout.
    start = time.monotonic()
    assert grade_math("\\boxed{9^{9^{9^{9^{9^{9}}}}}}", "1", timeout=1.0) is False
    assert time.monotonic() - start < 1.0 + 5.0
    for kind, text in PATHOLOGICAL:
        start = time.monotonic()
        assert PUBLIC[kind](text, "7", timeout=1.0) is False, (kind, text[:40])
        # 1 s of grading, plus the start-up of the worker replacing one killed by the previous item's timeout.
        assert time.monotonic() - start < 1.0 + 30.0, (kind, text[:40])
    assert grade_math(r"\boxed{\frac12}", "0.5") and grade_gsm8k("so 18", "#### 18") and grade_choice("Answer: B", "B")


def test_grade_tells_a_timeout_from_a_wrong_answer() -> None:
    hung = grade("math", HANG, "1", timeout=1.0)
    assert (hung.correct, hung.timed_out, hung.error) == (False, True, "timed out after 1 s")
    wrong = grade("math", r"\boxed{3}", "4", timeout=1.0)
    assert (wrong.correct, wrong.timed_out, wrong.extracted, wrong.error) == (False, False, "3", None)
    right = grade("choice", r"\boxed{\text{(C)}}", "c")
    assert (right.correct, right.timed_out, right.extracted) == (True, False, "C")
    # timeout=None grades in this process, without a bound.
    assert grade("math", r"\boxed{2}", "2", timeout=None) == grade_one("math", r"\boxed{2}", "2")
    for bad in (0, -1.0, True, "5"):
        with pytest.raises(ValueError, match="timeout"):
            grade("math", r"\boxed{2}", "2", timeout=bad)
    with pytest.raises(ValueError, match="unknown grading kind"):
        grade("essay", "x", "y")
    # Calls from several threads take turns on the shared worker.
    results: dict[int, bool] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, grade_gsm8k(f"so {i}", str(i))))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: True for i in range(8)}


def test_graders_work_from_a_script_without_a_main_guard(tmp_path: Path) -> None:
    # Workers are fresh interpreters, not multiprocessing children: those re-import a script's __main__ module,
    # which re-ran this top-level code in every worker and, with no main guard, made them all fail to start.
    script = tmp_path / "notebook_like.py"
    script.write_text(textwrap.dedent("""
        print("top level ran")
        from motab_jax.eval.grading import grade
        print(grade("math", "The answer is 1/2.", "0.5").correct, grade("gsm8k", "it costs $18", "18").correct)
    """))
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["top level ran", "True True"], out.stdout


# ----------------------------------------------------------------------------- degenerate outputs
DEGENERATE = [  # (completion, gold): none has a final answer, each ends in the gold's digits
    ("1 " * 500_000, "1"),  # a megabyte of one token
    ("1+" * 500_000 + "1", "1"),
    ("+1" * 500_000, "1"),
    ("1" * 10**6, "1"),
    ("x = 1\n" * 100_000, "1"),
    ("So the answer is 1. " * 50_000, "1"),  # repetitive: anchored, but a loop
    ("The answer is 1.\n" * 1_000, "1"),
    ("Therefore, the answer is " + "1, " * 2_000, "1"),
    # Truncated mid-reasoning: the last number is whatever came last.
    ("We compute 3 * 4 = 12, and then 12 + 5 = 17, and then we need to divide by 1", "1"),
    ("Let me try $x = 2$: then $2^2 = 4$. Now with $x = 1$", "1"),
    (r"The area is \boxed{\frac{1}{2} \cdot 1", "1"),  # a cut-off box
    ("I think the answer is going to be small. Let's check 1", "1"),  # the last statement has no answer
]
ANCHORED = [  # (completion, gold, expected): unboxed final-answer statements (EvalScope anchors the same phrases)
    ("The answer is 42.", "42", True),  # EvalScope: after "he answer is": "42"
    ("Adding up, the final answer is $\\frac{3}{4}$. I hope it is correct.", "0.75", True),
    ("**Answer:** 7", "7", True),
    ("Answer: 1/2", "0.5", True),
    ("So the answer is 3.5.", "3.5", True),
    ("So, the answer is $x = 5$.", "5", True),
    ("The answer is 1,000, as computed.", "1000", True),
    ("答案是 12", "12", True),
    ("The answer is 41.", "42", False),
    ("The answer is 1.\n\nWait, no: 2 + 2 = 4, so the answer is 4.", "4", True),  # the last statement counts
    ("The answer is 1.\n\nWait, no: 2 + 2 = 4, so the answer is 4.", "1", False),
]


@pytest.mark.parametrize("completion,gold", DEGENERATE, ids=range(len(DEGENERATE)))
def test_degenerate_repetitive_and_truncated_outputs_are_wrong(completion: str, gold: str) -> None:
    result = grade_one("math", completion, gold)
    assert (result.correct, result.error) == (False, None), result


@pytest.mark.parametrize("completion,gold,expected", ANCHORED, ids=range(len(ANCHORED)))
def test_unboxed_final_answer_statements_are_found(completion: str, gold: str, expected: bool) -> None:
    assert grade_one("math", completion, gold).correct is expected


def test_what_the_fallback_may_extract() -> None:
    assert anchored_answer("The answer is 42.") == "42"
    minerva = "Final Answer: The final answer is $\\dfrac{1}{2}$. I hope it is correct."
    assert anchored_answer(minerva) == "\\dfrac{1}{2}"
    assert anchored_answer("So the answer is **3**, done") == "3"
    assert anchored_answer("Therefore $x = 5$.") is None  # no statement: EvalScope's last-number fallback is not used
    assert anchored_answer("the answer is " + "9" * MAX_ANCHORED_ANSWER_CHARS) == "9" * MAX_ANCHORED_ANSWER_CHARS
    assert anchored_answer("the answer is " + "9" * (MAX_ANCHORED_ANSWER_CHARS + 1)) is None
    assert anchored_answer("the answer is\n42") is None  # the answer is on the statement's line
    assert extracted_answer("math", "Therefore $x = 5$.") is None
    assert extracted_answer("math", "The answer is $\\frac{1}{2}$, so...") == "\\frac{1}{2}"
    # GSM8K keeps its last-number convention, GPQA its letter search, except on a loop.
    assert grade_gsm8k("We compute 3 * 4 = 12, so 18", "18", timeout=None)
    assert not grade_gsm8k("18 " * 1000, "18", timeout=None)
    assert grade_gsm8k(r"\boxed{18} " * 1000, "18", timeout=None)  # a boxed answer is an answer
    assert extract_choice_letter("I pick (B)") == "B" and extract_choice_letter("(B) " * 1000) is None
    assert extract_choice_letter(r"\boxed{B} " * 1000) == "B"


def test_ends_in_loop_boundaries() -> None:
    rng = random.Random(0)

    def unit(n: int) -> str:  # a unit with no shorter period
        return "".join(rng.choice("abcdefghij ") for _ in range(n - 1)) + "!"

    w, p = LOOP_WINDOW_CHARS, LOOP_MAX_UNIT_CHARS
    assert ends_in_loop("12" * (w // 2 + 1)) and not ends_in_loop("12" * (w // 2) + "1")  # needs w + p characters
    assert ends_in_loop("intro " + unit(p) * (w // p + 1) + "  \n")  # the longest unit (trailing space aside)
    assert not ends_in_loop(unit(p + 1) * (2 * w // p))  # a longer unit is not a loop
    assert ends_in_loop(("So the answer is 1. " * 60)[:-7])  # cut mid-unit: still a loop
    natural = " ".join(f"step {i}: {i} * {i} = {i * i}." for i in range(200))
    assert len(natural) > 2 * w and not ends_in_loop(natural)
    assert not ends_in_loop(natural + "1 " * 400)  # a short run at the end is not the whole window
