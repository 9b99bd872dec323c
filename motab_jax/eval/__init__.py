"""Evaluation: bundled and hub benchmarks, isolated math-verify grading, pass@k / avg@k / cons@k, lengths."""

from motab_jax.eval.benchmarks import BENCHMARKS, BenchmarkSpec, Problem, load_problems, resolve
from motab_jax.eval.grading import (DEFAULT_TIMEOUT_S, GradeResult, grade, grade_choice, grade_gsm8k, grade_math,
                                    strip_thinking)
from motab_jax.eval.grading_pool import GradingPool
from motab_jax.eval.harness import EvalConfig, evaluate
from motab_jax.eval.metrics import avg_at_k, length_summary, majority_vote, pass_at_k, summarize

__all__ = ["BENCHMARKS", "DEFAULT_TIMEOUT_S", "BenchmarkSpec", "EvalConfig", "GradeResult", "GradingPool", "Problem",
           "avg_at_k", "evaluate", "grade", "grade_choice", "grade_gsm8k", "grade_math", "length_summary",
           "load_problems", "majority_vote", "pass_at_k", "resolve", "strip_thinking", "summarize"]
