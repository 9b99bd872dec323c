"""Benchmarks: bundled math sets, hub datasets, and local JSONL files, as lists of `Problem`s.

A benchmark is named by a key of `BENCHMARKS` ("math500", "aime24", "aime25", "amc23", "gsm8k",
"gpqa_diamond", "ifeval"), by "hub:<owner>/<name>[:<config>][@<split>]" for any hub dataset with a problem and an
answer column, or by a path to a local JSONL file with `problem` and `answer` fields.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Literal

from motab_jax.errors import EnvironmentProblem, MissingInputError, MotabInputError
from motab_jax.eval.ifeval import Instruction, read_prompts
from motab_jax.jsonl import iter_jsonl

DATA_DIR = Path(__file__).resolve().parent / "data"
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = ("Please reason step by step, and give your final answer as the letter of the correct option "
                      "within \\boxed{}, e.g. \\boxed{A}.")

Kind = Literal["math", "gsm8k", "choice", "ifeval"]


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    problem: str  # the text shown to the model (options included for multiple choice)
    answer: str  # gold answer (a letter for multiple choice; "" for IFEval)
    instructions: tuple[Instruction, ...] = ()  # IFEval: the verifiable instructions the response must follow


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    kind: Kind
    samples: int  # default number of samples per problem (the paper's protocol)
    source: str  # "bundled:<file>", "hub:<id>[:<config>][@<split>]" or a JSONL path
    instruction: str = MATH_INSTRUCTION  # appended to each problem in the user message ("" for none)


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "math500": BenchmarkSpec("math500", "math", 1, "bundled:math500.jsonl"),
    "aime24": BenchmarkSpec("aime24", "math", 8, "bundled:aime24.jsonl"),
    "aime25": BenchmarkSpec("aime25", "math", 8, "bundled:aime25.jsonl"),
    "amc23": BenchmarkSpec("amc23", "math", 8, "bundled:amc23.jsonl"),
    "gsm8k": BenchmarkSpec("gsm8k", "gsm8k", 1, "bundled:gsm8k_test.jsonl"),
    "gpqa_diamond": BenchmarkSpec("gpqa_diamond", "choice", 8, "hub:Idavidrein/gpqa:gpqa_diamond@train",
                                  CHOICE_INSTRUCTION),
    # The prompts are the user message as they are: they carry their own instructions.
    "ifeval": BenchmarkSpec("ifeval", "ifeval", 1, "bundled:ifeval.jsonl", instruction=""),
}


def resolve(name: str, samples: int | None = None) -> BenchmarkSpec:
    """The spec for a benchmark name, hub reference or JSONL path."""
    if name in BENCHMARKS:
        spec = BENCHMARKS[name]
    elif name.startswith("hub:"):
        spec = BenchmarkSpec(name.removeprefix("hub:").replace("/", "_").replace(":", "_"), "math", 1, name)
    elif name.endswith(".jsonl") or os.path.exists(name):
        spec = BenchmarkSpec(Path(name).stem, "math", 1, name)
    else:
        raise ValueError(f"unknown benchmark {name!r}; use one of {sorted(BENCHMARKS)}, 'hub:<owner>/<dataset>', "
                         "or a path to a JSONL file with 'problem' and 'answer' fields")
    return dataclasses.replace(spec, samples=samples) if samples else spec


def read_jsonl_problems(path: str | os.PathLike) -> list[Problem]:
    """Problems from a JSONL file; a malformed line or a missing field fails naming file and line."""
    problems = []
    for number, (row, where) in enumerate(iter_jsonl(path)):
        missing = [k for k in ("problem", "answer") if not isinstance(row, dict) or k not in row]
        if missing:
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise MotabInputError(f"{where}: missing field(s) {missing} (fields: {fields})")
        problems.append(Problem(str(row.get("id", number)), str(row["problem"]), str(row["answer"])))
    if not problems:
        raise MotabInputError(f"{path}: no problems")
    return problems


def _gpqa(rows: list[dict], seed: int) -> list[Problem]:
    """GPQA rows -> 4-option problems with the options shuffled reproducibly per question."""
    out = []
    for n, row in enumerate(rows):
        options = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"],
                   row["Incorrect Answer 3"]]
        order = list(range(4))
        random.Random(seed * 100003 + n).shuffle(order)
        letters = "ABCD"
        text = row["Question"].strip() + "\n\n" + "\n".join(
            f"{letters[i]}) {str(options[j]).strip()}" for i, j in enumerate(order))
        out.append(Problem(str(row.get("Record ID", n)), text, letters[order.index(0)]))
    return out


def _hub(reference: str, seed: int) -> list[Problem]:
    from motab_jax.models.loading import is_hub_offline

    dataset_id, _, split = reference.partition("@")
    dataset_id, _, config = dataset_id.partition(":")
    if is_hub_offline():
        raise EnvironmentProblem(f"benchmark {dataset_id} is only available from the Hugging Face hub, and "
                           "HF_HUB_OFFLINE=1; run where the hub is reachable (it is never bundled in plain text)")
    try:
        import datasets
    except ImportError as e:
        raise MotabInputError(f"benchmark {dataset_id} comes from the Hugging Face hub: pip install datasets") from e
    try:
        rows = list(datasets.load_dataset(dataset_id, config or None, split=split or "test"))
    except Exception as e:  # noqa: BLE001 - network, auth (GPQA is gated) or a missing split
        raise EnvironmentProblem(f"could not load {dataset_id} from the hub ({e}); GPQA is gated: accept its terms "
                           "on the hub and log in with `huggingface-cli login`") from e
    if dataset_id.endswith("gpqa"):
        return _gpqa(rows, seed)
    problem_key = next((k for k in ("problem", "question", "Question") if rows and k in rows[0]), None)
    answer_key = next((k for k in ("answer", "Answer", "final_answer") if rows and k in rows[0]), None)
    if problem_key is None or answer_key is None:
        raise MotabInputError(f"{dataset_id}: no problem/answer columns (columns: {sorted(rows[0]) if rows else []})")
    return [Problem(str(r.get("id", n)), str(r[problem_key]), str(r[answer_key])) for n, r in enumerate(rows)]


def load_problems(spec: BenchmarkSpec, *, limit: int | None = None, seed: int = 0) -> list[Problem]:
    if spec.kind == "ifeval":
        path = DATA_DIR / spec.source.removeprefix("bundled:") if spec.source.startswith("bundled:") else spec.source
        problems = [Problem(p.key, p.prompt, "", p.instructions) for p in read_prompts(path)]
    elif spec.source.startswith("bundled:"):
        problems = read_jsonl_problems(DATA_DIR / spec.source.removeprefix("bundled:"))
    elif spec.source.startswith("hub:"):
        problems = _hub(spec.source.removeprefix("hub:"), seed)
    else:
        if not Path(spec.source).exists():
            raise MissingInputError(f"benchmark file {spec.source} does not exist")
        problems = read_jsonl_problems(spec.source)
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"benchmark {spec.name}: problem ids are not unique")
    return problems[:limit] if limit else problems
