"""Reading SFT training examples from JSONL / Parquet files, Hugging Face datasets and TFDS.

Every source yields the same `Example`. Record shapes (detected per record, in this order):

* motab-jax synthesis records (`motab_jax.motab.records.build_record`): `id`, `sample_index`, `prompt`
  (text the chat template was already applied to), `response` and `segments` (student / revise / teacher
  runs whose texts concatenate to `response`). The prompt is marked `prompt_rendered=True`.
* chat records: `messages` = [{role, content}, ...]; the last message must be the assistant's and is the
  response, the messages before it are the prompt.
* pairs: `prompt`/`response`, `input`/`output` or `problem`/`solution` (or the `fields` given by the caller).

A malformed line or an invalid record raises `InvalidRecordError` naming the file, line (or row) and
field; with `skip_invalid=True` it is skipped and counted in `ReadStats` instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence
from motab_jax.errors import EnvironmentProblem, MissingInputError, MotabInputError
from motab_jax.jsonl import JsonlError, loads_line

__all__ = ["Example", "InvalidRecordError", "ReadStats", "hub_source_problem", "parse_record", "read_examples"]

# Prompt/response field pairs of generic records, tried in this order.
PAIR_FIELDS: tuple[tuple[str, str], ...] = (("prompt", "response"), ("input", "output"), ("problem", "solution"))
SEGMENT_SOURCES = ("student", "revise", "teacher")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_MAX_KEPT_ERRORS = 10


class InvalidRecordError(MotabInputError):
    """A record that cannot become an `Example`; the message starts with `<file>:<line>:` (or `row N`)."""


@dataclass(frozen=True)
class Example:
    """One SFT example.

    `prompt` is a chat message list, or text: raw text is wrapped as one user message before the chat
    template is applied, unless `prompt_rendered` says the template was already applied (synthesis records).
    `segments` (synthesis records only) split `response` by provenance; their texts concatenate to it.
    """

    id: str
    prompt: str | list[dict[str, Any]]
    response: str
    segments: list[dict[str, Any]] | None = None
    prompt_rendered: bool = False
    origin: str = ""  # "<file>:<line>" or "<dataset> row <n>", for error messages downstream


@dataclass
class ReadStats:
    """Counts of one `read_examples` call; `errors` keeps the first few skip reasons for logging."""

    num_examples: int = 0
    num_skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def skip(self, reason: str, message: str) -> None:
        self.num_skipped += 1
        self.skipped_by_reason[reason] = self.skipped_by_reason.get(reason, 0) + 1
        if len(self.errors) < _MAX_KEPT_ERRORS:
            self.errors.append(message)


# ----------------------------------------------------------------------------------------------- records


def _text_field(record: Mapping[str, Any], name: str, where: str) -> str:
    if name not in record:
        raise InvalidRecordError(f"{where}: missing field '{name}'")
    value = record[name]
    if not isinstance(value, str):
        raise InvalidRecordError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, name: str, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, (list, tuple)):
        raise InvalidRecordError(f"{where}: field '{name}' must be a list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidRecordError(f"{where}: field '{name}[{i}]' must be a {{role: str, content: str}} message")
        out.append(dict(m))
    return out


def _segments(record: Mapping[str, Any], response: str, where: str) -> list[dict[str, Any]]:
    value = record["segments"]
    if not isinstance(value, (list, tuple)):
        raise InvalidRecordError(f"{where}: field 'segments' must be a list")
    out = []
    for i, seg in enumerate(value):
        name = f"segments[{i}]"
        if not isinstance(seg, Mapping):
            raise InvalidRecordError(f"{where}: field '{name}' must be an object")
        if seg.get("source") not in SEGMENT_SOURCES:
            raise InvalidRecordError(f"{where}: field '{name}.source' must be one of {list(SEGMENT_SOURCES)}, "
                                     f"got {seg.get('source')!r}")
        text = _text_field(seg, "text", f"{where}: {name}")
        ids = seg.get("token_ids")
        if ids is not None:
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise InvalidRecordError(f"{where}: field '{name}.token_ids' must be a list of token ids")
            if seg.get("num_tokens") is not None and seg["num_tokens"] != len(ids):
                raise InvalidRecordError(f"{where}: field '{name}.num_tokens' = {seg['num_tokens']} but "
                                         f"token_ids has {len(ids)}")
            ids = [int(t) for t in ids]
        out.append({"source": seg["source"], "text": text, "token_ids": ids})
    # Formatting trusts the segments to be the response split up; a mismatch means a corrupted record.
    if "".join(s["text"] for s in out) != response:
        raise InvalidRecordError(f"{where}: field 'segments': the segment texts do not concatenate to 'response'")
    return out


def parse_record(record: Any, *, where: str, fields: tuple[str, str] | None = None) -> Example:
    """The `Example` of one record (a mapping); `where` ("file:line") prefixes every error message.

    `fields` = (prompt field, response field) forces a generic pair instead of detecting the shape.
    """
    if not isinstance(record, Mapping):
        raise InvalidRecordError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    rid = record.get("id")
    if fields is not None:
        prompt_field, response_field = fields
        return Example(id=str(rid) if rid is not None else where, prompt=_text_field(record, prompt_field, where),
                       response=_text_field(record, response_field, where), origin=where)
    if "segments" in record:
        for name in ("id", "sample_index"):
            if name not in record:
                raise InvalidRecordError(f"{where}: missing field '{name}' (a synthesis record: it has 'segments')")
        response = _text_field(record, "response", where)
        # id + sample index: several trajectories of one question must stay distinct examples.
        return Example(id=f"{record['id']}#{record['sample_index']}", prompt=_text_field(record, "prompt", where),
                       response=response, segments=_segments(record, response, where), prompt_rendered=True,
                       origin=where)
    if "messages" in record:
        messages = _messages(record["messages"], "messages", where)
        if not messages or messages[-1]["role"] != "assistant":
            last = messages[-1]["role"] if messages else None
            raise InvalidRecordError(f"{where}: field 'messages': the last message must be the assistant's "
                                     f"response (got role {last!r})")
        return Example(id=str(rid) if rid is not None else where, prompt=messages[:-1],
                       response=messages[-1]["content"], origin=where)
    for prompt_field, response_field in PAIR_FIELDS:
        if prompt_field in record or response_field in record:
            return Example(id=str(rid) if rid is not None else where,
                           prompt=_text_field(record, prompt_field, where),
                           response=_text_field(record, response_field, where), origin=where)
    accepted = ", ".join(f"'{p}'/'{r}'" for p, r in PAIR_FIELDS)
    raise InvalidRecordError(f"{where}: missing fields: a record needs 'messages', {accepted} or the synthesis "
                             f"fields (id, sample_index, prompt, response, segments); it has {sorted(record)}")


# ----------------------------------------------------------------------------------------------- sources


def _jsonl_records(path: Path, stats: ReadStats, skip_invalid: bool) -> Iterator[tuple[Any, str]]:
    """(record, "file:line") of each non-blank line; malformed lines raise or are counted."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):  # binary iteration splits on b"\n" only (see motab_jax.jsonl)
            if not line.strip():
                continue  # blank lines (a trailing newline, spacing) carry no record
            where = f"{path}:{number}"
            try:
                yield loads_line(line, where), where
            except JsonlError as e:
                if not skip_invalid:
                    raise InvalidRecordError(str(e)) from e
                stats.skip("malformed_json", str(e))


def _json_records(path: Path, stats: ReadStats, skip_invalid: bool) -> Iterator[tuple[Any, str]]:
    """A `.json` file: one JSON array of records (items numbered from 0), else read as JSONL."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _jsonl_records(path, stats, skip_invalid)
        return
    try:
        items = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRecordError(f"{path}: malformed JSON ({e})") from e
    for i, item in enumerate(items):
        yield item, f"{path}: item {i}"


def _parquet_records(path: Path) -> Iterator[tuple[Any, str]]:
    try:
        import pyarrow.parquet as pq  # optional: only Parquet inputs need it
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield record, f"{path}: row {row}"
            row += 1


def _split_spec(spec: str, default_split: str = "train") -> tuple[str, str]:
    name, _, split = spec.partition("@")
    return name, split or default_split


def hub_source_problem(spec: str) -> str | None:
    """Why the `hf:` source `spec` cannot be read here (a malformed spec; a hub dataset while HF_HUB_OFFLINE is
    set), or None; checked before anything loads."""
    body, _ = _split_spec(spec[len("hf:"):])
    dataset_id = body.partition(":")[0]
    if not dataset_id:
        return f"{spec!r}: expected hf:<id>[:<config>][@<split>]"
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline and not Path(dataset_id).exists():
        return (f"{spec!r}: HF_HUB_OFFLINE is set, so the hub dataset {dataset_id!r} cannot be downloaded; unset "
                "HF_HUB_OFFLINE, or save the dataset to disk (save_to_disk or JSONL/Parquet export) and pass its "
                "local path")
    return None


def _hf_records(spec: str) -> Iterator[tuple[Any, str]]:
    """`hf:<id>[:<config>][@<split>]`; <id> may be a local dataset folder (works offline)."""
    body, split = _split_spec(spec[len("hf:"):])
    dataset_id, _, config = body.partition(":")
    problem = hub_source_problem(spec)
    if problem is not None:
        raise (EnvironmentProblem if dataset_id else InvalidRecordError)(problem)
    local = Path(dataset_id).exists()
    try:
        import datasets  # optional: only hf: sources need it
    except ImportError as e:
        raise ImportError(f"{spec!r} needs the Hugging Face datasets package: pip install datasets") from e
    if local and ((Path(dataset_id) / "dataset_info.json").exists() or (Path(dataset_id) / "state.json").exists()):
        data = datasets.load_from_disk(dataset_id)  # a save_to_disk folder
        if isinstance(data, datasets.DatasetDict):
            data = data[split]
    else:
        data = datasets.load_dataset(dataset_id, config or None, split=split)
    for i, record in enumerate(data):
        yield record, f"{spec} row {i}"


def _tfds_value(value: Any) -> Any:
    """TFDS numpy values -> Python: bytes to str, arrays to lists, so records parse like JSON ones."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, Mapping):
        return {k: _tfds_value(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return _tfds_value(value.tolist())
    if isinstance(value, list):
        return [_tfds_value(v) for v in value]
    return value


def _tfds_records(spec: str) -> Iterator[tuple[Any, str]]:
    """`tfds:<name>[@<split>]`."""
    name, split = _split_spec(spec[len("tfds:"):])
    if not name:
        raise InvalidRecordError(f"{spec!r}: expected tfds:<name>[@<split>]")
    try:
        import tensorflow_datasets as tfds  # optional: only tfds: sources need it
    except ImportError as e:
        raise ImportError(f"{spec!r} needs TensorFlow Datasets: pip install tensorflow-datasets") from e
    for i, record in enumerate(tfds.as_numpy(tfds.load(name, split=split))):
        yield _tfds_value(record), f"{spec} row {i}"


def _file_records(path: Path, stats: ReadStats, skip_invalid: bool) -> Iterator[tuple[Any, str]]:
    if path.suffix == ".parquet":
        return _parquet_records(path)
    if path.suffix == ".json":
        return _json_records(path, stats, skip_invalid)
    return _jsonl_records(path, stats, skip_invalid)


def _records(source: str | os.PathLike, stats: ReadStats, skip_invalid: bool) -> Iterator[tuple[Any, str]]:
    text = os.fspath(source)
    if text.startswith("hf:"):
        return _hf_records(text)
    if text.startswith("tfds:"):
        return _tfds_records(text)
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _FILE_SUFFIXES)
        if not files:
            raise MissingInputError(f"{path}: no {'/'.join(_FILE_SUFFIXES)} files in this folder")
        return (item for p in files for item in _file_records(p, stats, skip_invalid))
    if not path.exists():
        raise MissingInputError(f"{path}: no such file (sources: a .jsonl/.json/.parquet file or folder, "
                                "hf:<id>[:<config>][@<split>], tfds:<name>[@<split>])")
    return _file_records(path, stats, skip_invalid)


def read_examples(source: str | os.PathLike | Sequence[str | os.PathLike], *, skip_invalid: bool = False,
                  fields: tuple[str, str] | None = None, limit: int | None = None) -> tuple[list[Example], ReadStats]:
    """All examples of `source` (one source or several, read in order) and the read counts.

    Sources: a `.jsonl`, `.json` or `.parquet` file, a folder of them (sorted by name),
    `hf:<id>[:<config>][@<split>]` (needs `datasets`) or `tfds:<name>[@<split>]` (needs `tensorflow-datasets`).
    `skip_invalid`: skip and count malformed lines and invalid records instead of raising.
    `fields`: (prompt, response) field names, overriding the shape detection. `limit`: stop after that many.
    """
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    stats = ReadStats()
    examples: list[Example] = []
    for src in sources:
        if limit is not None and len(examples) >= limit:
            break
        for record, where in _records(src, stats, skip_invalid):
            if limit is not None and len(examples) >= limit:
                break
            try:
                examples.append(parse_record(record, where=where, fields=fields))
            except InvalidRecordError as e:
                if not skip_invalid:
                    raise
                stats.skip("invalid_record", str(e))
    stats.num_examples = len(examples)
    return examples, stats
