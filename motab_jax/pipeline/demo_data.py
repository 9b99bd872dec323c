"""Procedurally generated multi-step arithmetic word problems for the embedded demo.

Each solution is written step by step, steps separated by the default delimiter ".\\n\\n", and ends with
the answer in \\boxed{}: exactly the shape MOTAB monitors and the evaluation harness grades.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ann", "Bob", "Cy", "Dee", "Eli", "Fay"]
ITEMS = ["apples", "pens", "cards", "coins"]


def make_problem(rng: random.Random, index: int) -> dict[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(2, 9)
    problem = f"{name} has {total} {item}."
    steps = [f"{name} starts with {total} {item}"]
    for _ in range(rng.randint(1, 2)):
        if rng.random() < 0.5 or total < 2:
            amount = rng.randint(1, 5)
            problem += f" {name} gets {amount} more."
            steps.append(f"{total} + {amount} = {total + amount}")
            total += amount
        else:
            amount = rng.randint(1, total - 1)
            problem += f" {name} gives away {amount}."
            steps.append(f"{total} - {amount} = {total - amount}")
            total -= amount
    problem += f" How many {item} are left?"
    solution = ".\n\n".join(steps) + f".\n\nThe answer is \\boxed{{{total}}}."
    return {"id": f"demo-{index}", "problem": problem, "solution": solution, "answer": str(total)}


def write_demo_data(folder: str | Path, train: int = 256, held_out: int = 40, seed: int = 0,
                    pretrain: int = 0) -> dict[str, Path]:
    """train.jsonl (problem, solution, answer: the synthesis questions), held_out.jsonl (evaluation) and
    pretrain.jsonl (the models' own training set; with `pretrain` = 0 it is the train split), disjoint by
    problem text."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < train + held_out + pretrain:
        row = make_problem(rng, len(rows))
        if row["problem"] not in seen:
            seen.add(row["problem"])
            rows.append(row)
    paths = {name: folder / f"{name}.jsonl" for name in ("train", "held_out", "pretrain")}
    splits = {"train": rows[:train], "held_out": rows[train:train + held_out],
              "pretrain": rows[train + held_out:] if pretrain else rows[:train]}
    for name, part in splits.items():
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths
