"""The SFT input pipeline: read examples, tokenize with loss masks, pack into rows, batch deterministically."""

from __future__ import annotations

from motab_jax.data.formatting import FormatStats, TokenizedExample, format_example, format_examples, render_prompt
from motab_jax.data.packing import PackedRow, PackStats, pack_examples
from motab_jax.data.pipeline import BATCH_KEYS, BatchIterator, SFTBuildStats, SFTDataset, build_sft_rows
from motab_jax.data.sources import Example, InvalidRecordError, ReadStats, parse_record, read_examples

__all__ = [
    "BATCH_KEYS",
    "BatchIterator",
    "Example",
    "FormatStats",
    "InvalidRecordError",
    "PackStats",
    "PackedRow",
    "ReadStats",
    "SFTBuildStats",
    "SFTDataset",
    "TokenizedExample",
    "build_sft_rows",
    "format_example",
    "format_examples",
    "pack_examples",
    "parse_record",
    "read_examples",
    "render_prompt",
]
