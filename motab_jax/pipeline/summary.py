"""The job's closing summary (results.md): accuracy per model, truncation and lengths per model and benchmark,
synthesis statistics per policy, stage times."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from motab_jax.eval.metrics import LENGTH_FIELDS

# results.md's first line: where the method, and how it differs from the paper and the released code, is written.
METHOD_LINE = "Method and differences from the paper: docs/METHOD.md"


def results_entry(summary: dict[str, Any]) -> dict[str, Any]:
    """What the eval stage records of one benchmark's summary (``evaluate``'s): avg@k and the length fields.

    The eval stage's result is ``{model: {benchmark: results_entry(summary)}}``; a plain avg@k number in
    place of the entry (stages recorded before the length fields existed) still reads.
    """
    return {"avg@k": summary.get("avg@k"), **{k: summary.get(k) for k in LENGTH_FIELDS}}


def _avg(score: Any) -> float | None:
    return score.get("avg@k") if isinstance(score, dict) else score


def _fmt(value: Any, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def accuracy_table(evaluation: dict[str, Any]) -> list[str]:
    models = {name: scores for name, scores in evaluation.items() if isinstance(scores, dict)}
    if not models:
        return []
    benchmarks = list(dict.fromkeys(b for scores in models.values() for b in scores))
    lines = ["| model | " + " | ".join(f"{Path(b).stem} avg@k (%)" for b in benchmarks) + " |",
             "| --- |" + " ---: |" * len(benchmarks)]
    for name, scores in models.items():
        cells = ["-" if _avg(scores.get(b)) is None else f"{100 * _avg(scores[b]):.1f}" for b in benchmarks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def length_rows(evaluation: dict[str, Any]) -> list[str]:
    """One row per model and benchmark with length fields: truncated fraction, mean / p50 / p90 generated length,
    accuracy with truncated samples counted wrong and over the non-truncated samples."""
    rows = []
    for name, scores in evaluation.items():
        for benchmark, score in (scores.items() if isinstance(scores, dict) else ()):
            if isinstance(score, dict) and score.get("truncated_fraction") is not None:
                rows.append(f"| {name} | {Path(benchmark).stem} | {_fmt(score['truncated_fraction'], '{:.1%}')} | "
                            f"{_fmt(score['length_mean'], '{:.0f}')} / {_fmt(score['length_p50'], '{:.0f}')} / "
                            f"{_fmt(score['length_p90'], '{:.0f}')} | "
                            f"{_fmt(score['accuracy_truncated_as_wrong'], '{:.1%}')} | "
                            f"{_fmt(score['accuracy_not_truncated'], '{:.1%}')} |")
    if not rows:
        return []
    return ["| model | benchmark | truncated (hit max_new_tokens) | generated tokens mean / p50 / p90 | "
            "accuracy, truncated = wrong | accuracy, not truncated |",
            "| --- | --- | ---: | ---: | ---: | ---: |", *rows]


def synthesis_table(synthesis: dict[str, Any]) -> list[str]:
    runs = {label: s for label, s in synthesis.items() if isinstance(s, dict)}
    if not runs:
        return []
    lines = ["| policy | records | breach rate | mean root-cause depth (t - t*) | tokens student / revise / teacher |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for label, s in runs.items():
        tokens = s.get("tokens") or {}
        lines.append(f"| {label} | {s.get('records', '-')} | {_fmt(s.get('breach_rate'))} | "
                     f"{_fmt(s.get('mean_root_cause_depth'))} | "
                     f"{tokens.get('student', 0):,} / {tokens.get('revise', 0):,} / {tokens.get('teacher', 0):,} |")
    return lines


def final_summary(summaries: dict[str, Any], wall_seconds: float) -> str:
    """Markdown: the accuracy table, the truncation and length table, the synthesis table, and the time of each
    stage. The first line points to the method map (the repository's docs/METHOD.md)."""
    parts = [METHOD_LINE, ""]
    if accuracy := accuracy_table(summaries.get("eval", {})):
        parts += ["## Accuracy", "", *accuracy, ""]
    if lengths := length_rows(summaries.get("eval", {})):
        parts += ["## Truncation and lengths", "", *lengths, ""]
    if synthesis := synthesis_table(summaries.get("synthesize", {})):
        parts += ["## Synthesis", "", *synthesis, ""]
    times = ", ".join(f"{stage} {s.get('seconds', 0):.0f} s" for stage, s in summaries.items())
    parts += ["## Stages", "", f"{times}; this invocation {wall_seconds:.0f} s (finished stages are skipped on "
              "reruns and keep their recorded times)."]
    return "\n".join(parts)
