"""The job's closing summary (results.md): accuracy per model, synthesis statistics per policy, stage times."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
        cells = ["-" if scores.get(b) is None else f"{100 * scores[b]:.1f}" for b in benchmarks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


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
    """Markdown: the accuracy table, the synthesis table, and the time of each stage."""
    parts = []
    if accuracy := accuracy_table(summaries.get("eval", {})):
        parts += ["## Accuracy", "", *accuracy, ""]
    if synthesis := synthesis_table(summaries.get("synthesize", {})):
        parts += ["## Synthesis", "", *synthesis, ""]
    times = ", ".join(f"{stage} {s.get('seconds', 0):.0f} s" for stage, s in summaries.items())
    parts += ["## Stages", "", f"{times}; this invocation {wall_seconds:.0f} s (finished stages are skipped on "
              "reruns and keep their recorded times)."]
    return "\n".join(parts)
