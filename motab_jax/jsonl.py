"""JSONL files, read and written in one way: one JSON value per line, lines ended by "\\n" only.

`json.dumps(..., ensure_ascii=False)` leaves U+0085, U+2028 and U+2029 raw inside strings, and `str.splitlines()`
(or a text-mode reader with other newline rules) splits on them, so a record whose text holds one would be cut in
two. Every JSONL reader of the project goes through `iter_jsonl` (or `read_records` / `read_jsonl` on top of it),
which splits the file's bytes on b"\\n" only. Appends survive being killed: whole fsynced lines, and a torn last
line is cut off on resume.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from motab_jax.errors import MissingInputError, MotabInputError, environment_problem


class JsonlError(MotabInputError):
    """A JSON file, or a line of a JSONL file, that is not JSON in UTF-8; the message starts with `<file>[:<line>]:`."""


def dumps_line(record: Any) -> str:
    """`record` as one JSONL line, its "\\n" included (non-ASCII text kept readable; never a raw "\\n" inside)."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def loads_line(line: bytes, where: str) -> Any:
    """The JSON value of one line (bytes, its "\\n" included or not); `where` ("file:line") starts the error."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JsonlError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line is {line[e.start:e.start + 1]!r}); "
                         "save the file as UTF-8") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JsonlError(f"{where}: malformed JSON line ({e.msg} at column {e.colno}); each line must be one JSON "
                         "value") from e


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value of a whole file (a config.json, an index); a missing file or one that is not UTF-8 JSON
    raises a `MotabInputError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise JsonlError(f"{path}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from e
    except json.JSONDecodeError as e:
        raise JsonlError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix or replace "
                         "the file") from e


def iter_jsonl(path: str | os.PathLike, *, torn_tail: bool = False) -> Iterator[tuple[Any, str]]:
    """(value, "file:line") of every non-blank line of `path`, split on b"\\n" only.

    `torn_tail`: a last line without its "\\n" that does not parse (what a killed writer leaves) is skipped
    instead of raising. A missing file raises `MissingInputError`.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):  # binary iteration splits on b"\n" only
            if not line.strip():
                continue  # blank lines (a trailing newline, spacing) carry no record
            try:
                yield loads_line(line, f"{path}:{number}"), f"{path}:{number}"
            except JsonlError:
                if torn_tail and not line.endswith(b"\n"):
                    return
                raise


def read_jsonl(path: str | os.PathLike, *, torn_tail: bool = False) -> list[Any]:
    """Every value of `path` (see `iter_jsonl`)."""
    return [value for value, _ in iter_jsonl(path, torn_tail=torn_tail)]


def read_records(path: str | os.PathLike, key_fields: Sequence[str]) -> dict[tuple, dict[str, Any]]:
    """Records of `path` by their key (the values of `key_fields`); missing file = none.

    A last line without its newline is what a killed writer leaves: it is cut off the file. Any other
    unreadable line is an error naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return {}
    records: dict[tuple, dict[str, Any]] = {}
    good_bytes = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):  # binary iteration splits on b"\n" only
            where = f"{path}:{number}"
            try:
                record = loads_line(line, where)
                key = tuple(record[k] for k in key_fields)
            except (JsonlError, KeyError, TypeError) as e:
                if not line.endswith(b"\n"):
                    break
                reason = e if isinstance(e, JsonlError) else f"{where}: not a record with fields {list(key_fields)}"
                raise JsonlError(f"{reason}; remove the line or write to a new file") from e
            records[key] = record
            good_bytes += len(line)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records


def append_records(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Append each record as one whole line (a single write, flushed and fsynced), passing it through.

    A full or read-only disk raises `EnvironmentProblem` naming the file; the lines written before stay whole
    (a partly written line is cut off when the file is next read with `read_records`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a", encoding="utf-8")
    except OSError as e:
        problem = environment_problem(e, f"opening {path} to append records")
        if problem is None:
            raise
        raise problem from e
    try:
        for record in records:
            try:
                f.write(dumps_line(record))
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                problem = environment_problem(e, f"appending a record to {path}")
                if problem is None:
                    raise
                raise problem from e
            yield record
    finally:
        try:
            f.close()
        except OSError:  # the buffer of a failed write: its error is the one raised above
            pass


# ------------------------------------------------------------------ one file written in shards by several processes
_SHARD = re.compile(r"\.part-(\d+)-of-(\d+)$")


def shard_path(path: str | os.PathLike, index: int, count: int) -> Path:
    """The file process `index` of `count` writes its share of `path`'s records to, in a stage that runs one engine
    per host (`pipeline.multihost`): synthesis_motab.jsonl -> synthesis_motab.part-0-of-2.jsonl; `path` itself for
    one process. Shards keep `path`'s suffix, so globs of the stage's outputs (a redo's deletion) take them too."""
    path = Path(path)
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count}: need 0 <= index < count")
    return path if count == 1 else path.with_name(f"{path.stem}.part-{index}-of-{count}{path.suffix}")


def shard_files(path: str | os.PathLike) -> list[Path]:
    """Every shard of `path` on disk (of any process count: a job relaunched with another count leaves the old ones)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if p.suffix == path.suffix and p.stem.startswith(path.stem)
                  and _SHARD.fullmatch(p.stem[len(path.stem):]))


def merge_shards(path: str | os.PathLike, key_fields: Sequence[str], order: Any) -> list[dict[str, Any]]:
    """Rewrite `path` as the union of its records and its shards' (`shard_files`), one record per key (the values of
    `key_fields`; a key written twice, by a process that redid work another had finished, keeps its first copy),
    sorted by `order(record)`: the file no longer depends on how many processes wrote it or when each record
    finished. Written atomically (a temporary file renamed over `path`), then the shards are deleted; a kill at
    any point leaves every record in `path` or in a shard. Call it when no process is writing. Returns the records."""
    path = Path(path)
    records: dict[tuple, dict[str, Any]] = {}
    for source in [path, *shard_files(path)]:
        for key, record in read_records(source, key_fields).items():
            records.setdefault(key, record)
    merged = sorted(records.values(), key=order)
    tmp = path.with_name(path.name + ".merging")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(dumps_line(r) for r in merged)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        problem = environment_problem(e, f"writing {path} (the merge of its shards)")
        if problem is None:
            raise
        raise problem from e
    for shard in shard_files(path):
        shard.unlink()
    return merged
