"""`evaluate`: sample every benchmark problem, grade in isolated workers (IFEval's instruction checks in
process), stream per-sample records, and summarise avg@k, pass@k and cons@k.

Outputs in `output_dir`: `<benchmark>.samples.jsonl` (one fsynced line per sample: benchmark, problem id,
sample index, prompt, completion, extracted answer, gold, correct, timed out, finish reason, number of
tokens; for IFEval also the instruction ids and each one's strict and loose verdict), and
`summary.json` / `summary.md` with every benchmark's metrics (IFEval: its four accuracies too). A rerun
skips samples already graded in the samples file, so an interrupted evaluation resumes where it stopped.
Samples are appended as they finish; when a benchmark is done its file is rewritten in canonical order (problem,
then sample index), so it does not depend on scheduling, on where a run resumed, or on how many processes
shared the work (`evaluate(shard=...)` then `finish_evaluation`: one engine per host, `pipeline.multihost`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from motab_jax.eval.benchmarks import BenchmarkSpec, Problem, load_problems, resolve
from motab_jax.eval.grading import DEFAULT_TIMEOUT_S, GradingPool, strip_thinking
from motab_jax.eval.ifeval import judge, summarize_ifeval
from motab_jax.eval.metrics import length_summary, length_table, summarize
from motab_jax.jsonl import append_records, merge_shards, read_records, shard_path
from motab_jax.models.transformer import Decoder
from motab_jax.motab.generation import GenerationConfig, generate_rows
from motab_jax.sampling.generate import completion, default_stop_tokens
from motab_jax.sampling.rules import make_rule
from motab_jax.sampling.sampler import bucket
from motab_jax.text.harmony import final_text, is_harmony_tokenizer
from motab_jax.text.prompts import question_prompt

log = logging.getLogger("motab_jax")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Defaults follow the paper: temperature 0.6, top-p 0.95, up to 32768 new tokens, 8 samples per
    problem (1 for MATH-500, GSM8K and IFEval)."""

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
    item_timeout: float = DEFAULT_TIMEOUT_S  # seconds per graded sample; a timeout counts as wrong and is reported
    grading_deadline: float = 600.0  # seconds for grading one batch of samples

    def __post_init__(self) -> None:
        if self.prompt_format not in ("chat", "raw"):
            raise ValueError(f"prompt_format={self.prompt_format!r}; accepted: 'chat', 'raw'")
        if self.samples < 0 or self.limit < 0 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("samples and limit must be >= 0; batch_size and max_new_tokens >= 1")


# The evaluation pool is sized from each host's free memory, capped at what its slots can use: smaller slots make
# the cap, the same on every host, the size (one engine over several processes needs the same pool everywhere).
EVAL_POOL_HINT = ("lower eval.batch_size or eval.max_new_tokens until the evaluation pool's full size fits every "
                  "host's free memory")


def build_prompt(tokenizer: Any, problem: Problem, spec: BenchmarkSpec, config: EvalConfig) -> tuple[str, list[int]]:
    return question_prompt(tokenizer, problem.problem, spec.instruction, prompt_format=config.prompt_format,
                           system_prompt=config.system_prompt)


def _table(summaries: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per benchmark (IFEval's avg@k is its prompt-level strict accuracy and it has no
    cons@k), then IFEval's four accuracies when it was evaluated."""
    lines = ["| benchmark | problems | samples | avg@k (P@1) | pass@k | cons@k | timed out |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, s in summaries.items():
        n = s["samples_per_problem"]
        cons = f"{100 * s[f'cons@{n}']:.2f}" if f"cons@{n}" in s else "-"
        lines.append(f"| {name} | {s['num_problems']} | {n} | {100 * s['avg@k']:.2f} ± {100 * s['avg@k_stderr']:.2f} "
                     f"| {100 * s[f'pass@{n}']:.2f} | {cons} | {s['timed_out']} |")
    ifeval = {name: s for name, s in summaries.items() if s.get("kind") == "ifeval"}
    if ifeval:
        lines += ["", "| benchmark | prompts | instructions | prompt strict | instruction strict | prompt loose "
                  "| instruction loose |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {name} | {s['num_problems']} | {s['num_instructions']} | {100 * s['prompt_level_strict']:.2f} "
                  f"| {100 * s['instruction_level_strict']:.2f} | {100 * s['prompt_level_loose']:.2f} "
                  f"| {100 * s['instruction_level_loose']:.2f} |" for name, s in ifeval.items()]
    return "\n".join(lines + ["", length_table(summaries)])


def samples_file(output_dir: str | os.PathLike, benchmark: str) -> Path:
    return Path(output_dir) / f"{benchmark}.samples.jsonl"


_SAMPLE_KEY = ("problem_id", "sample_index")


def evaluate(model: Decoder, tokenizer: Any, output_dir: str | os.PathLike, config: EvalConfig | None = None,
             *, progress: bool = True, pool: GradingPool | None = None,
             shard: tuple[int, int] = (0, 1)) -> dict[str, dict[str, Any]]:
    """Evaluate `model` on `config.benchmarks`; returns {benchmark: summary} and writes the output files.

    `pool`: grading workers to use (and leave running), e.g. one pool for several models; by default a pool
    is started and stopped here (starting its workers costs seconds: fresh interpreters importing sympy).

    `shard` = (index, count), count > 1: this process samples and grades only the samples n = problem position x
    samples + sample index with n % count == index, into `jsonl.shard_path(<benchmark>.samples.jsonl, index,
    count)`, and returns {}; once every process has finished, one of them calls `finish_evaluation`. A sample's
    random key depends on (seed, problem position, sample index) only, so it does not depend on the shard."""
    config = config or EvalConfig()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = [resolve(name, config.samples or None) for name in config.benchmarks]
    rule = make_rule(config.temperature, config.top_p, config.top_k)
    stops = default_stop_tokens(model, tokenizer)
    with contextlib.ExitStack() as stack:
        if pool is None and any(spec.kind != "ifeval" for spec in specs):  # IFEval is judged in process
            pool = stack.enter_context(GradingPool(num_workers=config.grading_workers,
                                                   item_timeout=config.item_timeout))
        for spec in specs:
            _sample_and_grade(model, tokenizer, spec, config, rule, stops, pool, samples_file(out, spec.name),
                              progress, shard)
    return {} if shard[1] > 1 else finish_evaluation(out, config)


def finish_evaluation(output_dir: str | os.PathLike, config: EvalConfig) -> dict[str, dict[str, Any]]:
    """Merge each benchmark's samples (its file and the shards of `evaluate(shard=...)`) into its file in canonical
    order, summarise them, write summary.json / summary.md; returns {benchmark: summary}. Call it when no process
    is sampling into `output_dir`."""
    out = Path(output_dir)
    summaries: dict[str, dict[str, Any]] = {}
    for spec in (resolve(name, config.samples or None) for name in config.benchmarks):
        problems = load_problems(spec, limit=config.limit or None, seed=config.seed)
        position = {p.id: n for n, p in enumerate(problems)}
        merge_shards(samples_file(out, spec.name), _SAMPLE_KEY, lambda r: (
            position.get(r["problem_id"], len(position)), str(r["problem_id"]), r["sample_index"]))
        summaries[spec.name] = _summarize(spec, problems, samples_file(out, spec.name))
    (out / "summary.json").write_text(json.dumps(summaries, indent=2))
    table = _table(summaries)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    return summaries


def _unchanged(text: str) -> str:
    return text


def _grades(spec: BenchmarkSpec, problems: Sequence[Problem], group: Sequence[tuple[tuple[int, int], Any]],
            pool: GradingPool | None, config: EvalConfig, answer_text: Callable[[str], str]) -> list[dict[str, Any]]:
    """Each sample's grading fields: extracted answer, gold, correct, timed out (+ IFEval's verdicts), graded on
    `answer_text(completion)` (a gpt-oss reply's final channel)."""
    if spec.kind == "ifeval":
        # The checks are regexes and counts bounded in time (linear on any text): no worker process needed.
        out = []
        for (i, _), c in group:
            verdict = judge(strip_thinking(answer_text(c.text)), problems[i].instructions)
            out.append({"extracted_answer": None, "gold": None, "correct": all(verdict.strict), "timed_out": False,
                        "instruction_ids": [ins.id for ins in problems[i].instructions],
                        "followed_strict": list(verdict.strict), "followed_loose": list(verdict.loose)})
        return out
    assert pool is not None
    grades = pool.grade([(spec.kind, answer_text(c.text), problems[i].answer) for (i, _), c in group],
                        deadline=config.grading_deadline)
    return [{"extracted_answer": g.extracted, "gold": problems[i].answer, "correct": g.correct,
             "timed_out": g.timed_out} for ((i, _), _), g in zip(group, grades)]


def _sample_and_grade(model: Decoder, tokenizer: Any, spec: BenchmarkSpec, config: EvalConfig, rule: Any,
                      stops: Sequence[int], pool: GradingPool | None, path: Path, progress: bool,
                      shard: tuple[int, int]) -> None:
    """Sample and grade the samples of `shard` not yet in `path` or in the shard's file, appending them there."""
    problems = load_problems(spec, limit=config.limit or None, seed=config.seed)
    part, parts = shard
    written = shard_path(path, part, parts)
    done = read_records(path, _SAMPLE_KEY) | (read_records(written, _SAMPLE_KEY) if parts > 1 else {})
    todo = [(i, j) for i, p in enumerate(problems) for j in range(spec.samples)
            if (i * spec.samples + j) % parts == part and (p.id, j) not in done]
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
                           config=GenerationConfig(num_slots=config.batch_size, pool_hint=EVAL_POOL_HINT))
    group: list[tuple[tuple[int, int], Any]] = []
    # gpt-oss answers in harmony channels: only the final channel is graded, as `</think>` is stripped for Qwen3.
    answer_text = final_text if is_harmony_tokenizer(tokenizer) else _unchanged
    for n, (index, row) in enumerate(stream, 1):
        group.append((todo[index], completion(row.tokens, None, row.hit_stop, tokenizer)))
        if len(group) == config.batch_size or n == len(todo):
            records = ({"benchmark": spec.name, "problem_id": problems[i].id, "sample_index": j,
                        "prompt": prompts[i][0], "completion": c.text, "finish_reason": c.finish_reason,
                        "num_tokens": len(c.token_ids), **grade}
                       for ((i, j), c), grade in zip(group, _grades(spec, problems, group, pool, config, answer_text)))
            for _ in append_records(written, records):
                bar.update(1)
            group = []
    bar.close()


def _summarize(spec: BenchmarkSpec, problems: Sequence[Problem], path: Path) -> dict[str, Any]:
    records = read_records(path, _SAMPLE_KEY)
    missing = [f"{p.id}#{j}" for p in problems for j in range(spec.samples) if (p.id, j) not in records]
    if missing:
        raise RuntimeError(f"{path}: {len(missing)} of {len(problems) * spec.samples} samples are missing "
                           f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}) after every process "
                           "finished: a bug; please report it (rerun the same command to sample them)")
    rows = [[records[(p.id, j)] for j in range(spec.samples)] for p in problems]
    summary = summarize([{"correct": [r["correct"] for r in samples],
                          "answers": [r["extracted_answer"] for r in samples]} for samples in rows])
    if spec.kind == "ifeval":  # avg@k is the prompt-level strict accuracy; majority voting has no meaning here
        summary.pop(f"cons@{spec.samples}")
        summary.pop(f"cons@{spec.samples}_stderr")
        summary.update(summarize_ifeval(rows))
    ids = {p.id for p in problems}
    summary["timed_out"] = sum(r["timed_out"] for r in records.values() if r["problem_id"] in ids)
    summary["kind"] = spec.kind
    summary.update(length_summary([r for samples in rows for r in samples]))  # truncation, lengths
    log.info("%s: avg@%d %.4f over %d problems", spec.name, spec.samples, summary["avg@k"], len(problems))
    return summary
