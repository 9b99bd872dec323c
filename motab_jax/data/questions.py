"""Synthesis questions: one check for a question (file line or library value) and the question-file reader.

A question is an object with an `id` (string or integer; default: its position) and its text in `problem`,
`question` or `prompt` (the first present is used), or an already tokenized `prompt_ids`. Ids are unique:
records and resume are keyed by (id, sample index). The pipeline's preflight reads the question file with
`read_question_file` before any weights load, so a bad file fails with its file and line named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from motab_jax.data.sources import InvalidRecordError, read_examples
from motab_jax.jsonl import iter_jsonl

QUESTION_FIELDS = ("problem", "question", "prompt")
_SHAPE = "an object with 'id' and 'problem' (or 'question' / 'prompt', or 'prompt_ids')"


def checked_question(item: Any, position: int, where: str) -> tuple[str, str, tuple[int, ...]]:
    """(id, text, prompt ids) of one question: a string (its text) or a mapping; raises `InvalidRecordError`
    naming `where` (e.g. "questions.jsonl:3" or "question 2") and the field."""
    if isinstance(item, str):
        if not item.strip():
            raise InvalidRecordError(f"{where}: the question is empty")
        return str(position), item, ()
    if not isinstance(item, Mapping):
        raise InvalidRecordError(f"{where}: a question must be {_SHAPE}, got {type(item).__name__}")
    qid = item.get("id", position)
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise InvalidRecordError(f"{where}: field 'id' must be a string or an integer, got {qid!r}")
    ids = item.get("prompt_ids")
    if ids is not None and (not isinstance(ids, (list, tuple)) or not ids
                            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
        raise InvalidRecordError(f"{where}: field 'prompt_ids' must be a non-empty list of token ids (integers "
                                 f">= 0)")
    name = next((f for f in QUESTION_FIELDS if f in item), None)
    if name is None:
        if ids is None:
            raise InvalidRecordError(f"{where}: no 'problem', 'question', 'prompt' or 'prompt_ids' field (fields: "
                                     f"{sorted(item)})")
        return str(qid), "", tuple(ids)
    text = item[name]
    if not isinstance(text, str):
        raise InvalidRecordError(f"{where}: field {name!r} must be a string, got {type(text).__name__}")
    if not text.strip() and ids is None:
        raise InvalidRecordError(f"{where}: field {name!r} is empty; give the question's text")
    return str(qid), text, tuple(ids or ())


def checked_questions(items: Sequence[Any], wheres: Sequence[str] | None = None
                      ) -> list[tuple[str, str, tuple[int, ...]]]:
    """`checked_question` of each item, and unique ids; `wheres` name the items in errors (default
    "question <n>")."""
    wheres = wheres if wheres is not None else [f"question {n}" for n in range(len(items))]
    out, first_seen = [], {}
    for n, (item, where) in enumerate(zip(items, wheres)):
        qid, text, ids = checked_question(item, n, where)
        if qid in first_seen:
            raise InvalidRecordError(f"{where}: id {qid!r} repeats the id of {first_seen[qid]}; question ids must be "
                                     "unique (records and resume are keyed by id)")
        first_seen[qid] = where
        out.append((qid, text, ids))
    return out


def read_question_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The questions of a JSONL file, every line checked (UTF-8, JSON, an object with a non-empty problem, a
    unique id); an empty file is an error. Errors are `MotabInputError`s naming the file and line."""
    rows, wheres = [], []
    for row, where in iter_jsonl(path):
        rows.append(row)
        wheres.append(where)
    if not rows:
        raise InvalidRecordError(f"{path}: no questions (the file is empty); give one JSON object per line with "
                                 "'id' and 'problem'")
    for row, where in zip(rows, wheres):  # every line's fields first: a duplicate id needs them all readable
        if not isinstance(row, Mapping):
            raise InvalidRecordError(f"{where}: a question must be {_SHAPE}, got {type(row).__name__}")
    checked_questions(rows, wheres)
    return rows


def read_questions(source: str | os.PathLike, limit: int = 0, fields: str = "") -> list[dict[str, Any]]:
    """Training questions: a JSONL file with `id` and `problem` (or `question` / `prompt`), or any source
    `read_examples` reads (e.g. `hf:GAIR/LIMO-v2@train`) with `fields` = "question,solution" naming its question
    and solution columns. `limit` > 0 keeps the first that many."""
    if str(source).startswith(("hf:", "tfds:")) or fields:
        pair = tuple(f.strip() for f in fields.split(",")) if fields else None
        if pair is not None and len(pair) != 2:
            raise InvalidRecordError(f"data.question_fields={fields!r}: give two column names, "
                                     "'question,solution'")
        examples, _ = read_examples(str(source), fields=pair, limit=limit or None)
        return [{"id": e.id, "problem": e.prompt if isinstance(e.prompt, str) else e.prompt[-1]["content"]}
                for e in examples]
    questions = read_question_file(Path(source))
    return questions[:limit] if limit else questions
