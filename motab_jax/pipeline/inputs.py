"""The job's inputs that are not models, checked before any weights load: the run directory, the question
file, the benchmark files and hub data sets; and the message for a config field that does not exist.

Each check returns problems (strings naming the field, file and line, and what to do), like `validate_config`.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from motab_jax.data.questions import read_question_file
from motab_jax.data.sources import hub_source_problem, read_examples
from motab_jax.errors import MotabInputError
from motab_jax.eval.benchmarks import load_problems, resolve
from motab_jax.jsonl import iter_jsonl
from motab_jax.models.loading import is_hub_offline

QUESTION_STAGES = ("pretrain", "synthesize", "kd")  # the stages that read data.questions


def run_dir_problems(run_dir: str) -> list[str]:
    """A run_dir that is a file, lies under a file, or cannot be written."""
    path = Path(run_dir).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == path else f"is under {existing}, which is a file"
        return [f"run_dir={run_dir!r} {what}, not a folder; give a folder for the job's outputs"]
    if not os.access(existing, os.W_OK | os.X_OK):
        folder = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        return [f"run_dir={run_dir!r} {folder} (a read-only disk or folder); give a folder you can write to"]
    return []


def _message(error: BaseException) -> str:
    """An exception's message as written (a KeyError's str() adds quotes)."""
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def question_problems(data: Any, stages: list[str]) -> list[str]:
    """The question file read as the synthesize stage will read it (every line checked; an empty file is a
    problem); an `hf:` source while offline."""
    source = str(data.questions)
    if not set(QUESTION_STAGES) & set(stages) or source in ("", "demo") or source.startswith("tfds:"):
        return []  # "" and tfds: are reported by validate_config / when read; "demo" is generated
    if source.startswith("hf:"):
        problem = hub_source_problem(source)
        return [f"data.questions: {problem}"] if problem else []
    path = Path(source).expanduser()
    if not path.is_file():
        return []  # validate_config names a missing path
    try:
        if data.question_fields:  # columns named by the user: read as the stage does
            pair = tuple(f.strip() for f in str(data.question_fields).split(","))
            if len(pair) == 2 and not read_examples(path, fields=pair)[0]:
                return [f"data.questions: {path}: no questions (the file is empty)"]
        else:
            read_question_file(path)
    except MotabInputError as e:
        return [f"data.questions: {e}"]
    return []


def benchmark_problems(evaluation: Any, stages: list[str]) -> list[str]:
    """Benchmark JSONL files read as evaluation will read them (UTF-8 JSON lines with `problem` and `answer`,
    unique ids); hub benchmarks while offline."""
    if "eval" not in stages:
        return []
    problems = []
    for name in (b.strip() for b in str(evaluation.benchmarks).split(",") if b.strip()):
        if name == "demo":
            continue
        try:
            spec = resolve(name)
        except ValueError:
            continue  # validate_config names an unknown benchmark
        if spec.source.startswith("hub:"):
            if is_hub_offline():
                problems.append(f"eval.benchmarks: {name!r} comes from the Hugging Face hub "
                                f"({spec.source.removeprefix('hub:')}) and HF_HUB_OFFLINE=1; drop it, run where the "
                                "hub is reachable, or export it to a JSONL file with 'problem' and 'answer'")
            continue
        if spec.source.startswith("bundled:") or not Path(spec.source).is_file():
            continue  # bundled files are tested; a missing file is validate_config's
        try:
            for _ in iter_jsonl(spec.source):  # UTF-8 and JSON, line by line, named
                pass
            load_problems(spec)  # the fields and unique ids, by the benchmark reader's own rules
        except (MotabInputError, ValueError, KeyError) as e:
            problems.append(f"eval.benchmarks: {_message(e)}")
    return problems


def input_problems(config: Any, stages: list[str]) -> list[str]:
    """Every data input problem the job would meet after loading its models, found before."""
    return question_problems(config.data, stages) + benchmark_problems(config.eval, stages)


def _paths(config: Any, prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        out.append(path)
        if hasattr(value, "items"):
            out += _paths(value, path + ".")
    return out


def _likeness(name: str, field: str) -> float:
    """How close a mistyped field name is to an existing one: their similarity (less when the first letters
    differ: typos rarely hit the first letter), at least 0.6 when they start alike ("epsilon" for "eps0")."""
    prefix = len(os.path.commonprefix([name, field]))
    ratio = difflib.SequenceMatcher(None, name, field).ratio() * (1.0 if prefix else 0.8)
    return max(ratio, 0.6 if prefix >= 3 else 0.0)


def unknown_field_message(config: Any, dotted: str) -> str | None:
    """None when `dotted` ("synthesis.eps0") names a field of `config`; else a message naming the first part
    that does not exist and the closest existing fields."""
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
        if hasattr(node, "items") and part in node:
            node = node[part]
            continue
        where = ".".join(parts[:i])
        # Fields of the same section first, then the same name elsewhere.
        scores = [(_likeness(part, p.rpartition(".")[2]) + 0.25 * bool(where and p.rpartition(".")[0] == where), p)
                  for p in _paths(config)]
        close = [p for score, p in sorted(scores, reverse=True) if score >= 0.55][:5]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        section = f"section {where!r}" if where else "the configuration"
        return f"{dotted!r}: {section} has no field {part!r}{hint} (configs/base.py lists every field)"
    return None
