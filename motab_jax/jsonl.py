"""Append-only JSONL files that survive being killed: whole fsynced lines, torn last line cut on resume."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence


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
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                key = tuple(record[k] for k in key_fields)
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                if not line.endswith(b"\n"):
                    break
                raise ValueError(f"{path}:{number}: not a record with fields {list(key_fields)} ({e}); remove "
                                 "the line or write to a new file") from e
            records[key] = record
            good_bytes += len(line)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records


def append_records(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Append each record as one whole line (a single write, flushed and fsynced), passing it through."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            yield record
