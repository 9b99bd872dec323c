"""Procedurally generated multi-step arithmetic word problems for the embedded demo.

A problem is a starting amount and a daily change over 3 to 6 days ("Ann has 43 pens and gets 8 more each day. How
many pens after 4 days?"); the solution takes one step per day ("Day 2: 51+8=59"), steps separated by the default
delimiter ".\\n\\n", and ends with the answer in \\boxed{}: exactly the shape MOTAB monitors and the evaluation
harness grades. The running total stays in 10..99 and the change is 2..9.

Each row also carries `student_solution`: the same solution written with one systematic misconception, the demo
student's pretraining target. The student forgets the carry when the units digits add up to 15 or more (57+8=55)
and the borrow when the change exceeds the units digit by 5 or more (52-8=54), then carries on correctly from its
wrong total. About 59% of problems have no such step, and the first slip falls on any day (1 to 6), so the student
is competent but imperfect and its errors are local: one wrong step in an otherwise sound solution, which is the
situation MOTAB is for. The teacher learns the correct solutions, and (`recovery_example`) to go on from the right
total when the step before it is wrong, as a strong teacher reads a solution: it does not take a wrong total on trust.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

NAMES = ["Ann", "Bob", "Cy", "Dee", "Eli", "Fay", "Gus", "Ivy"]
ITEMS = ["apples", "pens", "cards", "coins", "shells", "stamps"]
MIN_DAYS, MAX_DAYS = 3, 6
LOW, HIGH = 10, 99  # the running total's range: every number in a step has one or two digits
MIN_CHANGE, MAX_CHANGE = 2, 9
# The student's misconception: a carry (borrow) is forgotten when the units digits overshoot 10 (0) by at least this.
SLIP_AT = 5


def make_problem(rng: random.Random, index: int) -> dict[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    days, gets = rng.randint(MIN_DAYS, MAX_DAYS), rng.random() < 0.5
    change = rng.randint(MIN_CHANGE, min(MAX_CHANGE, (HIGH - LOW) // days))
    start = rng.randint(LOW, HIGH - days * change) if gets else rng.randint(LOW + days * change, HIGH)
    problem = (f"{name} has {start} {item} and gets {change} more each day. How many {item} after {days} days?" if gets
               else f"{name} has {start} {item} and gives away {change} each day. How many {item} are left after "
                    f"{days} days?")
    solution, answer = _solution(start, change if gets else -change, days, slips=False)
    student_solution, _ = _solution(start, change if gets else -change, days, slips=True)
    return {"id": f"demo-{index}", "problem": problem, "solution": solution, "answer": answer,
            "student_solution": student_solution}


def _solution(start: int, change: int, days: int, slips: bool) -> tuple[str, str]:
    """The step-by-step text and the answer; with `slips`, every step that meets the misconception's condition
    forgets its carry (its borrow), and later steps start from that wrong total."""
    total, steps = start, []
    for day in range(1, days + 1):
        after = total + change
        units = total % 10 + change
        if slips and units >= 10 + SLIP_AT:
            after -= 10
        elif slips and units <= -SLIP_AT:
            after += 10
        steps.append(f"Day {day}: {total}{'+' if change > 0 else '-'}{abs(change)}={after}")
        total = after
    return ".\n\n".join(steps) + f".\n\nThe answer is \\boxed{{{total}}}.", str(total)


_STEP = re.compile(r"Day (\d+): (\d+)([+-])(\d+)=(\d+)")


def recovery_example(solution: str, rng: random.Random, delimiter: str = ".\n\n") -> tuple[str, str]:
    """(prefix, continuation) of a correct `solution`: the prefix is its steps up to a random day k, with day k's
    result written wrong (its carry or borrow forgotten, or one digit off); the continuation is the rest of the
    correct solution, which goes on from the RIGHT total (day k+1 starts from it, or the answer is the right one).

    The demo teacher trains on the continuation (the prefix is context, not a target: `mask_flawed`), so it learns
    to recompute the running total instead of copying whatever the last step says. A copying teacher scores every
    step after a wrong total as right, so a slip that passed the gate is never caught and the root cause of a breach
    is always the breaching step itself (t* = t). This one gives the step after a slip a wrong number (the total it
    starts from), so a slip that passed can still be caught there, by a drop smaller than the slip's own, and
    backtracking then finds the slip (t* < t).
    """
    steps = solution.split(delimiter)
    days = [_STEP.fullmatch(s) for s in steps[:-1]]
    if not days or not all(days):
        raise ValueError(f"not a demo solution (steps 'Day d: a+c=b' then the answer): {solution!r}")
    k = rng.randrange(len(days))
    day, total, sign, change, right = days[k].groups()
    right_value = int(right)
    wrong = set()
    for candidate in (right_value - 10, right_value + 10,  # the carry / borrow forgotten or doubled
                      *(right_value // 10 * 10 + u for u in range(10)),  # the units digit off
                      *(t * 10 + right_value % 10 for t in range(1, 10))):  # the tens digit off
        if LOW <= candidate <= HIGH and candidate != right_value:
            wrong.add(candidate)
    # Half the time the misconception's own slip (a ten lost or gained) when it is a two-digit number.
    tens = sorted(c for c in wrong if abs(c - right_value) == 10)
    value = rng.choice(tens) if tens and rng.random() < 0.5 else rng.choice(sorted(wrong))
    wrong_day = f"Day {day}: {total}{sign}{change}={value}"
    return delimiter.join(steps[:k] + [wrong_day]) + delimiter, delimiter.join(steps[k + 1:])


def write_demo_data(folder: str | Path, train: int = 256, held_out: int = 40, seed: int = 0,
                    pretrain: int = 0) -> dict[str, Path]:
    """train.jsonl (problem, solution, answer: the synthesis questions), held_out.jsonl (evaluation) and
    pretrain.jsonl (the models' own training set; with `pretrain` = 0 it is the train split), disjoint by
    solution (so by problem text too)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < train + held_out + pretrain:
        row = make_problem(rng, len(rows))
        if row["solution"] not in seen:  # distinct arithmetic (a name or item alone does not make a new problem)
            seen.add(row["solution"])
            rows.append(row)
    paths = {name: folder / f"{name}.jsonl" for name in ("train", "held_out", "pretrain")}
    splits = {"train": rows[:train], "held_out": rows[train:train + held_out],
              "pretrain": rows[train + held_out:] if pretrain else rows[:train]}
    for name, part in splits.items():
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def first_wrong_step(solution: str, response: str, delimiter: str = ".\n\n") -> int | None:
    """The 1-based index of the first step of `response` that is not the reference `solution`'s step at that index
    (steps split on `delimiter`; surrounding whitespace and a final "." ignored), or None when every step of
    `response` matches.

    A demo problem has exactly one correct solution text, so the first differing step is where a trajectory went
    wrong (an arithmetic slip whose result the later steps carry on); a response cut short is judged on the steps
    it has (a partial last step counts when it is not a prefix of the reference step).
    """
    reference = [s.strip().rstrip(".") for s in solution.split(delimiter)]
    steps = [s.strip().rstrip(".") for s in response.split(delimiter)]
    for index, step in enumerate(steps):
        expected = reference[index] if index < len(reference) else None
        last = index == len(steps) - 1
        if expected is None:
            return index + 1 if step else None
        if step != expected and not (last and expected.startswith(step)):
            return index + 1
    return None
