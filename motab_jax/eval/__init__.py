"""Evaluation: bundled and hub benchmarks, isolated math-verify grading, pass@k / avg@k / cons@k."""

from motab_jax.eval.benchmarks import BENCHMARKS, BenchmarkSpec, Problem, load_problems, resolve
from motab_jax.eval.grading import GradeResult, GradingPool, grade_choice, grade_gsm8k, grade_math, strip_thinking
from motab_jax.eval.harness import EvalConfig, evaluate
from motab_jax.eval.metrics import avg_at_k, majority_vote, pass_at_k, summarize

__all__ = ["BENCHMARKS", "BenchmarkSpec", "EvalConfig", "GradeResult", "GradingPool", "Problem", "avg_at_k",
           "evaluate", "grade_choice", "grade_gsm8k", "grade_math", "load_problems", "majority_vote", "pass_at_k",
           "resolve", "strip_thinking", "summarize"]
