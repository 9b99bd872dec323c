"""Minimal safetensors reader (zero-copy `np.memmap` views) and writer.

The official `safetensors` package copies each tensor into memory on read; loading a 32B teacher
shard by shard onto a device mesh only needs the slices each device owns, so tensors are exposed as
memory-mapped views and sliced lazily. Format: 8-byte little-endian header size, JSON header
{name: {dtype, shape, data_offsets}}, then the raw little-endian data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from motab_jax.errors import CheckpointError

__all__ = ["DTYPES", "CheckpointError", "SafetensorsFile", "save_safetensors"]

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """Read-only, memory-mapped view of one `.safetensors` file.

    Opening checks the header against the file: every tensor's dtype, shape and byte range, and that the file
    holds all of its data (a truncated download fails here, naming the file and the first tensor cut off).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        redo = "download or export it again"
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (shorter than 8 bytes); {redo}")
            (header_size,) = struct.unpack("<Q", raw)
            if header_size > 100_000_000:
                raise CheckpointError(f"{self.path}: not a safetensors file (header size {header_size}); {redo}")
            try:
                header = json.loads(f.read(header_size))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e}); {redo}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object); {redo}")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict] = header
        self._data_start = 8 + header_size
        data_bytes = self.path.stat().st_size - self._data_start
        for name, entry in header.items():
            self._check_entry(name, entry, redo)
        cut = [(entry["data_offsets"][0], name) for name, entry in header.items()
               if entry["data_offsets"][1] > data_bytes]
        if cut:
            _, name = min(cut)
            raise CheckpointError(f"{self.path}: truncated: the file has {self._data_start + data_bytes} bytes but "
                                  f"tensor {name} (the first cut off, of {len(cut)}) ends at byte "
                                  f"{self._data_start + header[name]['data_offsets'][1]} (an interrupted download or "
                                  f"copy?); {redo}")
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

    def _check_entry(self, name: str, entry: object, redo: str) -> None:
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]  # type: ignore[index]
            count = math.prod(int(d) for d in shape)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: tensor {name}: corrupt header entry {entry!r}; {redo}") from e
        if dtype not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {dtype}; supported: "
                                  f"{sorted(DTYPES)}")
        if end - begin != count * DTYPES[dtype].itemsize or begin < 0:
            raise CheckpointError(f"{self.path}: tensor {name}: bytes [{begin}, {end}) do not hold its shape "
                                  f"{tuple(shape)} of {dtype}; the file is corrupt, {redo}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """A zero-copy read-only view of tensor `name`."""
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + begin:self._data_start + end]
        return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (written one at a time, in order) to `path` atomically."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, array in items:
        if array.dtype not in _NAMES:
            raise ValueError(f"tensor {name}: dtype {array.dtype} cannot be written to safetensors")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data aligned to 8 bytes, as the reference writer does
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, array in items:
            f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    os.replace(tmp, path)
