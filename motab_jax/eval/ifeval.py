"""IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models"): the prompts with
their verifiable instructions, strict and loose verdicts, and the four metrics.

A response is judged per instruction: strict on the response itself, loose on the best of eight variants
(the response with its first line, last line or both removed, each with and without "*"), as the
authors' `evaluation.py` does; an empty (whitespace-only) response follows nothing. Metrics: prompt-level
accuracy (every instruction of the prompt followed; the primary, as the authors and evalscope report it)
and instruction-level accuracy (followed instructions over all instructions, micro-averaged as in the
reference's report and lm-eval), each strict and loose.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

from motab_jax.errors import MotabInputError
from motab_jax.eval.ifeval_checks import CHECKS, RELATIONS
from motab_jax.jsonl import iter_jsonl

METRICS = ("prompt_level_strict", "instruction_level_strict", "prompt_level_loose", "instruction_level_loose")


@dataclasses.dataclass(frozen=True)
class Instruction:
    id: str  # e.g. "punctuation:no_comma", a key of ifeval_checks.CHECKS
    kwargs: Mapping[str, Any]  # the check's arguments, e.g. {"num_words": 300, "relation": "at least"}


@dataclasses.dataclass(frozen=True)
class IFEvalPrompt:
    key: str
    prompt: str  # the user message, as is (no instruction appended)
    instructions: tuple[Instruction, ...]


@dataclasses.dataclass(frozen=True)
class Verdict:
    strict: tuple[bool, ...]  # per instruction, in the prompt's order
    loose: tuple[bool, ...]


def _check_kwargs(instruction_id: str, kwargs: dict[str, Any]) -> str | None:
    """What is wrong with `kwargs` for `instruction_id`, or None."""
    try:
        inspect.signature(CHECKS[instruction_id]).bind("response", **kwargs)
    except TypeError as e:
        return f"arguments {kwargs} do not fit {instruction_id} ({e})"
    for name in ("relation", "let_relation", "capital_relation"):
        if name in kwargs and kwargs[name] not in RELATIONS:
            return f"{name}={kwargs[name]!r}; accepted: {list(RELATIONS)}"
    if "letter" in kwargs and len(str(kwargs["letter"]).strip()) != 1:
        return f"letter={kwargs['letter']!r}: must be one character"
    if "nth_paragraph" in kwargs and not 1 <= kwargs["nth_paragraph"] <= kwargs.get("num_paragraphs", 0):
        return f"nth_paragraph={kwargs['nth_paragraph']}: must be in 1..num_paragraphs"
    return None


def read_prompts(path: str | os.PathLike) -> list[IFEvalPrompt]:
    """IFEval prompts from a JSONL file in the authors' format: `key`, `prompt`, `instruction_id_list` and
    `kwargs` (one dict per instruction; None-valued entries, as in the hub copy, are dropped). A malformed
    line, an unknown instruction or arguments that do not fit it fail naming the file and line."""
    prompts = []
    # One JSONL reader for the project (splits on "\n" only), naming file and line.
    for row, where in iter_jsonl(path):
        missing = [k for k in ("key", "prompt", "instruction_id_list", "kwargs")
                   if not isinstance(row, dict) or k not in row]
        if missing:
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise MotabInputError(f"{where}: missing field(s) {missing} (fields: {fields})")
        ids, all_kwargs = row["instruction_id_list"], row["kwargs"]
        if len(ids) != len(all_kwargs):
            raise MotabInputError(f"{where}: {len(ids)} instructions but {len(all_kwargs)} kwargs entries")
        instructions = []
        for instruction_id, kwargs in zip(ids, all_kwargs):
            if instruction_id not in CHECKS:
                raise MotabInputError(f"{where}: unknown instruction {instruction_id!r}; known: {sorted(CHECKS)}")
            kwargs = {k: v for k, v in (kwargs or {}).items() if v is not None}
            if problem := _check_kwargs(instruction_id, kwargs):
                raise MotabInputError(f"{where}: {problem}")
            instructions.append(Instruction(instruction_id, kwargs))
        prompts.append(IFEvalPrompt(str(row["key"]), str(row["prompt"]), tuple(instructions)))
    if not prompts:
        raise MotabInputError(f"{path}: no prompts")
    return prompts


def loose_variants(response: str) -> list[str]:
    """The eight texts the loose verdict tries, in the reference's order."""
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *cut, *(text.replace("*", "") for text in cut)]


def _follows(instruction: Instruction, response: str) -> bool:
    return bool(response.strip()) and CHECKS[instruction.id](response, **instruction.kwargs)


def judge(response: str, instructions: Sequence[Instruction]) -> Verdict:
    """Strict and loose verdicts of `response` (thinking already stripped) on each instruction."""
    strict = tuple(_follows(i, response) for i in instructions)
    # The first variant is the response itself (judged already); equal variants are judged once.
    others = [text for text in dict.fromkeys(loose_variants(response)) if text != response]
    return Verdict(strict=strict, loose=tuple(followed or any(_follows(i, text) for text in others)
                                              for i, followed in zip(instructions, strict)))


def summarize_ifeval(per_problem: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """The four metrics from per-problem samples, each sample a record with `followed_strict` and
    `followed_loose` (one flag per instruction). Prompt-level accuracies are means over problems of the
    per-problem fraction of samples that followed everything (with one sample: the fraction of prompts);
    instruction-level accuracies are over all instructions of all samples."""
    if not per_problem or any(not samples for samples in per_problem):
        raise ValueError("summarize_ifeval: every problem needs at least one sample")
    out: dict[str, Any] = {"num_instructions": sum(len(samples[0]["followed_strict"]) for samples in per_problem)}
    for mode in ("strict", "loose"):
        field = f"followed_{mode}"
        prompt_level = [sum(all(s[field]) for s in samples) / len(samples) for samples in per_problem]
        flags = [flag for samples in per_problem for s in samples for flag in s[field]]
        out[f"prompt_level_{mode}"] = sum(prompt_level) / len(prompt_level)
        out[f"instruction_level_{mode}"] = sum(flags) / len(flags) if flags else 0.0
    return out
