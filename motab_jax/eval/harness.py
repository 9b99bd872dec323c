"""`evaluate`: sample every benchmark problem, grade in isolated workers, stream per-sample records, and
summarise avg@k, pass@k and cons@k.

Outputs in `output_dir`: `<benchmark>.samples.jsonl` (one fsynced line per sample: benchmark, problem id,
sample index, prompt, completion, extracted answer, gold, correct, timed out, finish reason), and
`summary.json` / `summary.md` with every benchmark's metrics. A rerun skips samples already graded in
the samples file, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from motab_jax.eval.benchmarks import BenchmarkSpec, Problem, load_problems, resolve
from motab_jax.eval.grading import GradingPool
from motab_jax.eval.metrics import summarize
from motab_jax.jsonl import append_records, read_records
from motab_jax.models.transformer import Decoder
from motab_jax.motab.generation import GenerationConfig, generate_rows
from motab_jax.sampling.generate import completion, default_stop_tokens
from motab_jax.sampling.rules import make_rule
from motab_jax.sampling.sampler import bucket
from motab_jax.text.prompts import question_prompt

log = logging.getLogger("motab_jax")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Defaults follow the paper: temperature 0.6, top-p 0.95, up to 32768 new tokens, 8 samples per
    problem (1 for MATH-500 and GSM8K)."""

    benchmarks: tuple[str, ...] = ("math500", "aime24", "aime25", "amc23")
    samples: int = 0  # 0: each benchmark's default
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 32768
    batch_size: int = 64
    seed: int = 0
    limit: int = 0  # 0: all problems
    prompt_format: str = "chat"  # "chat" (the tokenizer's chat template) or "raw"
    system_prompt: str = ""
    grading_workers: int = 2
    item_timeout: float = 5.0  # seconds per graded sample; a timeout counts as wrong and is reported
    grading_deadline: float = 600.0  # seconds for grading one batch of samples

    def __post_init__(self) -> None:
        if self.prompt_format not in ("chat", "raw"):
            raise ValueError(f"prompt_format={self.prompt_format!r}; accepted: 'chat', 'raw'")
        if self.samples < 0 or self.limit < 0 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("samples and limit must be >= 0; batch_size and max_new_tokens >= 1")


def build_prompt(tokenizer: Any, problem: Problem, spec: BenchmarkSpec, config: EvalConfig) -> tuple[str, list[int]]:
    return question_prompt(tokenizer, problem.problem, spec.instruction, prompt_format=config.prompt_format,
                           system_prompt=config.system_prompt)


def _table(summaries: dict[str, dict[str, Any]]) -> str:
    lines = ["| benchmark | problems | samples | avg@k (P@1) | pass@k | cons@k | timed out |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in summaries.items():
        n = s["samples_per_problem"]
        lines.append(f"| {name} | {s['num_problems']} | {n} | {100 * s['avg@k']:.2f} ± {100 * s['avg@k_stderr']:.2f} "
                     f"| {100 * s[f'pass@{n}']:.2f} | {100 * s[f'cons@{n}']:.2f} | {s['timed_out']} |")
    return "\n".join(lines)


def evaluate(model: Decoder, tokenizer: Any, output_dir: str | os.PathLike, config: EvalConfig | None = None,
             *, progress: bool = True, pool: GradingPool | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate `model` on `config.benchmarks`; returns {benchmark: summary} and writes the output files.

    `pool`: grading workers to use (and leave running), e.g. one pool for several models; by default a pool
    is started and stopped here (starting its workers costs seconds: fresh interpreters importing sympy)."""
    config = config or EvalConfig()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = [resolve(name, config.samples or None) for name in config.benchmarks]
    rule = make_rule(config.temperature, config.top_p, config.top_k)
    stops = default_stop_tokens(model, tokenizer)
    summaries: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(GradingPool(num_workers=config.grading_workers,
                                                   item_timeout=config.item_timeout))
        for spec in specs:
            summaries[spec.name] = _evaluate_one(model, tokenizer, spec, config, rule, stops, pool,
                                                 out / f"{spec.name}.samples.jsonl", progress)
    (out / "summary.json").write_text(json.dumps(summaries, indent=2))
    table = _table(summaries)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    return summaries


def _evaluate_one(model: Decoder, tokenizer: Any, spec: BenchmarkSpec, config: EvalConfig, rule: Any,
                  stops: Sequence[int], pool: GradingPool, path: Path, progress: bool) -> dict[str, Any]:
    problems = load_problems(spec, limit=config.limit or None, seed=config.seed)
    done = read_records(path, ("problem_id", "sample_index"))
    todo = [(i, j) for i, p in enumerate(problems) for j in range(spec.samples) if (p.id, j) not in done]
    prompts = {i: build_prompt(tokenizer, problems[i], spec, config) for i in sorted({i for i, _ in todo})}
    limit = model.config.max_position_embeddings
    for i, (_, ids) in prompts.items():
        if bucket(len(ids)) + config.max_new_tokens > limit:
            raise ValueError(f"{spec.name} problem {problems[i].id}: prompt ({len(ids)} tokens, padded to "
                             f"{bucket(len(ids))}) + max_new_tokens ({config.max_new_tokens}) exceed the model's "
                             f"{limit} positions; lower max_new_tokens")
    bar = tqdm(total=len(todo), desc=spec.name, unit="sample", disable=not progress)
    # Every sample is one row of the engine (continuous batching over batch_size slots); finished samples
    # are graded and appended in groups of batch_size, so an interruption loses at most one group.
    stream = generate_rows(model, [prompts[i][1] for i, _ in todo], [i * spec.samples + j for i, j in todo],
                           rule=rule, max_new_tokens=config.max_new_tokens, stop_tokens=stops, seed=config.seed,
                           config=GenerationConfig(num_slots=config.batch_size))
    group: list[tuple[tuple[int, int], Any]] = []
    for n, (index, row) in enumerate(stream, 1):
        group.append((todo[index], completion(row.tokens, None, row.hit_stop, tokenizer)))
        if len(group) == config.batch_size or n == len(todo):
            grades = pool.grade([(spec.kind, c.text, problems[i].answer) for (i, _), c in group],
                                deadline=config.grading_deadline)
            records = ({"benchmark": spec.name, "problem_id": problems[i].id, "sample_index": j,
                        "prompt": prompts[i][0], "completion": c.text, "extracted_answer": grade.extracted,
                        "gold": problems[i].answer, "correct": grade.correct, "timed_out": grade.timed_out,
                        "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids)}
                       for ((i, j), c), grade in zip(group, grades))
            for _ in append_records(path, records):
                bar.update(1)
            group = []
    bar.close()
    records = read_records(path, ("problem_id", "sample_index"))
    per_problem = []
    for p in problems:
        rows = [records[(p.id, j)] for j in range(spec.samples)]
        per_problem.append({"correct": [r["correct"] for r in rows], "answers": [r["extracted_answer"] for r in rows]})
    summary = summarize(per_problem)
    ids = {p.id for p in problems}
    summary["timed_out"] = sum(r["timed_out"] for r in records.values() if r["problem_id"] in ids)
    summary["kind"] = spec.kind
    log.info("%s: avg@%d %.4f over %d problems", spec.name, spec.samples, summary["avg@k"], len(problems))
    return summary
