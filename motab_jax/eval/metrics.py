"""Sampling metrics for reasoning benchmarks: pass@k, avg@k, cons@k (majority vote), truncation and lengths,
summaries."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["LENGTH_FIELDS", "avg_at_k", "length_summary", "length_table", "majority_vote", "pass_at_k", "summarize"]

# What length_summary adds to a benchmark's summary (and results.md shows).
LENGTH_FIELDS = ("truncated_fraction", "length_mean", "length_p50", "length_p90", "accuracy_truncated_as_wrong",
                 "accuracy_not_truncated")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from ``n`` samples with ``c`` correct: 1 - C(n-c, k) / C(n, k).

    Uses the product form 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al., 2021), which avoids the
    huge binomials. Raises ValueError unless 0 <= c <= n and 1 <= k <= n.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"pass_at_k: {name} must be an int, got {value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(correct: Sequence[bool]) -> float:
    """Mean accuracy over the samples of one problem (avg@k); ValueError when empty."""
    if len(correct) == 0:
        raise ValueError("avg_at_k: no samples")
    return sum(bool(x) for x in correct) / len(correct)


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """cons@k: whether the most frequent extracted answer is a correct one.

    Answers are compared after stripping whitespace; None and empty answers do not vote. Ties go
    to the answer that occurred first. The winner's correctness is that of its first sample
    (graders are deterministic, so equal answers grade equally). False when nothing voted.
    """
    if len(answers) != len(correct):
        raise ValueError(f"majority_vote: {len(answers)} answers but {len(correct)} correctness flags")
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        key = answer.strip() if answer is not None else ""
        if key:
            counts[key] = counts.get(key, 0) + 1
            first.setdefault(key, i)
    if not counts:
        return False
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return bool(correct[first[best]])


def _mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarize(per_problem: list[dict[str, Any]]) -> dict[str, Any]:
    """Benchmark summary from per-problem samples.

    Each entry is ``{"correct": [bool] * n, "answers": [str | None] * n}`` (the extracted answers,
    for cons@n); every problem must have the same n >= 1. Returns ``num_problems``,
    ``samples_per_problem`` (n), ``avg@k`` (mean over problems of the per-problem accuracy),
    ``pass@{k}`` for k = 1..n (mean over problems of ``pass_at_k``), ``cons@{n}``, each with a
    ``<name>_stderr``: the sample standard deviation over problems / sqrt(num_problems), 0 for a
    single problem.
    """
    if not per_problem:
        raise ValueError("summarize: no problems")
    n = None
    for i, row in enumerate(per_problem):
        if "correct" not in row or "answers" not in row:
            raise ValueError(f"summarize: problem {i} needs 'correct' and 'answers' lists, got keys {sorted(row)}")
        if len(row["correct"]) != len(row["answers"]):
            raise ValueError(f"summarize: problem {i} has {len(row['correct'])} correctness flags "
                             f"but {len(row['answers'])} answers")
        n = len(row["correct"]) if n is None else n
        if len(row["correct"]) != n or n == 0:
            raise ValueError(f"summarize: every problem needs the same number (>= 1) of samples; problem 0 has "
                             f"{len(per_problem[0]['correct'])}, problem {i} has {len(row['correct'])}")
    assert n is not None
    out: dict[str, Any] = {"num_problems": len(per_problem), "samples_per_problem": n}

    def put(name: str, values: list[float]) -> None:
        out[name], out[f"{name}_stderr"] = _mean_and_stderr(values)

    put("avg@k", [avg_at_k(row["correct"]) for row in per_problem])
    for k in range(1, n + 1):
        put(f"pass@{k}", [pass_at_k(n, sum(bool(x) for x in row["correct"]), k) for row in per_problem])
    put(f"cons@{n}", [float(majority_vote(row["answers"], row["correct"])) for row in per_problem])
    return out


def length_summary(samples: Sequence[Mapping[str, Any]], *, correct_key: str = "correct") -> dict[str, Any]:
    """Truncation, generated length and accuracy with and without the truncated samples.

    Each sample (a per-sample record of the harness) needs ``finish_reason`` ("length": it hit
    ``max_new_tokens``; anything else, e.g. "stop", ended on its own), ``num_tokens`` (generated tokens) and
    ``correct_key`` (bool). Returns, over the n samples pooled across problems:
    ``samples`` (n), ``truncated`` (count) and ``truncated_fraction``; ``length_mean``, ``length_p50`` and
    ``length_p90`` of ``num_tokens`` (percentiles interpolated linearly between order statistics, numpy's
    default); ``accuracy_truncated_as_wrong``: correct samples that were not truncated / n;
    ``accuracy_not_truncated``: the same over the non-truncated samples only (None when every sample was
    truncated); ``truncated_correct``: truncated samples graded correct anyway (a box written before the
    budget ran out; avg@k counts them, the two accuracies here do not).
    """
    if not samples:
        raise ValueError("length_summary: no samples")
    for i, sample in enumerate(samples):
        missing = [k for k in ("finish_reason", "num_tokens", correct_key) if k not in sample]
        if missing:
            raise ValueError(f"length_summary: sample {i} has no {missing} (keys: {sorted(sample)}); the evaluation "
                             "harness's per-sample records have them")
    truncated = [s["finish_reason"] == "length" for s in samples]
    correct = [bool(s[correct_key]) for s in samples]
    lengths = np.asarray([s["num_tokens"] for s in samples], dtype=np.float64)
    stopped = len(samples) - sum(truncated)
    right = sum(c and not t for c, t in zip(correct, truncated))
    p50, p90 = np.percentile(lengths, [50, 90])
    return {"samples": len(samples), "truncated": sum(truncated), "truncated_fraction": sum(truncated) / len(samples),
            "length_mean": float(lengths.mean()), "length_p50": float(p50), "length_p90": float(p90),
            "accuracy_truncated_as_wrong": right / len(samples),
            "accuracy_not_truncated": right / stopped if stopped else None,
            "truncated_correct": sum(c and t for c, t in zip(correct, truncated))}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def length_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of the ``length_summary`` fields of each benchmark's summary (rows without them: "-")."""
    lines = ["| benchmark | truncated (%) | mean length | p50 | p90 | accuracy, truncated = wrong (%) | "
             "accuracy, not truncated (%) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in summaries.items():
        if "truncated_fraction" not in s:
            lines.append(f"| {name} |" + " - |" * 6)
            continue
        lines.append(f"| {name} | {_percent(s['truncated_fraction'])} | {s['length_mean']:.1f} | {s['length_p50']:.1f} "
                     f"| {s['length_p90']:.1f} | {_percent(s['accuracy_truncated_as_wrong'])} | "
                     f"{_percent(s['accuracy_not_truncated'])} |")
    return "\n".join(lines)
