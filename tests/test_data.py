"""Tests for motab_jax.data: sources, loss masks, packing and the checkpointable batch iterator.

Oracles: transformers' own `apply_chat_template` (prompt tokens / full conversation text), the
tokenizer's `decode` of masked-in tokens against the response text, the GSM8K test file's examples
(token multisets before and after packing) and an uninterrupted iterator run.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from motab_jax.data import (
    BATCH_KEYS,
    BatchIterator,
    Example,
    InvalidRecordError,
    PackedRow,
    SFTDataset,
    TokenizedExample,
    build_sft_rows,
    format_example,
    format_examples,
    pack_examples,
    parse_record,
    read_examples,
)
from motab_jax.errors import EnvironmentProblem, MissingInputError
from motab_jax.text import byte_level_tokenizer, qwen_tokenizer

GSM8K = Path(__file__).resolve().parents[1] / "motab_jax" / "eval" / "data" / "gsm8k_test.jsonl"
SEQ_LEN = 768  # byte-level GSM8K examples average ~545 tokens: many share rows, some get truncated


@pytest.fixture(scope="module")
def byte_tok() -> PreTrainedTokenizerFast:
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def qwen3() -> PreTrainedTokenizerFast:
    return qwen_tokenizer("qwen3")


@pytest.fixture(params=["byte", "qwen3"])
def tok(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return request.getfixturevalue("byte_tok" if request.param == "byte" else "qwen3")


def _masked_in_text(tok: PreTrainedTokenizerFast, item: TokenizedExample) -> str:
    return tok.decode(item.input_ids[item.loss_mask == 1].tolist(), skip_special_tokens=False)


def _write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- formatting


CHAT = {"id": "c1", "messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12 + 30? Ünïcödé 日本"},
    {"role": "assistant", "content": "<think>\n12 + 30 = 42\n</think>\n\nThe answer is 42. 🎉"},
]}


def test_chat_mask_selects_exactly_the_response(tok: PreTrainedTokenizerFast) -> None:
    example = parse_record(CHAT, where="chat")
    item = format_example(example, tok)
    prompt_messages, response = CHAT["messages"][:-1], CHAT["messages"][-1]["content"]
    prompt_ids = tok.apply_chat_template(prompt_messages, add_generation_prompt=True)["input_ids"]
    n = len(prompt_ids)
    assert item.input_ids[:n].tolist() == prompt_ids
    assert item.num_prompt_tokens == n
    assert item.loss_mask[:n].sum() == 0 and item.loss_mask[n:].all()
    assert _masked_in_text(tok, item) == response + tok.eos_token
    assert item.input_ids[-1] == tok.eos_token_id
    # The whole sequence is the template's rendering of the full conversation (minus the newline after eos).
    full = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tok.decode(item.input_ids.tolist(), skip_special_tokens=False) + "\n" == full


def test_text_prompt_becomes_a_user_message(byte_tok: PreTrainedTokenizerFast) -> None:
    example = parse_record({"input": "Say hi", "output": "hi"}, where="x")
    item = format_example(example, byte_tok)
    expected = byte_tok.apply_chat_template([{"role": "user", "content": "Say hi"}],
                                            add_generation_prompt=True)["input_ids"]
    assert item.input_ids[:len(expected)].tolist() == expected
    assert _masked_in_text(byte_tok, item) == "hi<|im_end|>"
    raw = format_example(example, byte_tok, apply_chat_template=False)
    assert raw.input_ids[:raw.num_prompt_tokens].tolist() == byte_tok.encode("Say hi", add_special_tokens=False)


def test_cutoff_len_truncates_and_drops_long_prompts(byte_tok: PreTrainedTokenizerFast) -> None:
    examples = [Example("a", "q", "a fairly long response"), Example("b", "x" * 100, "y")]
    prompt_len = format_example(examples[0], byte_tok).num_prompt_tokens
    items, stats = format_examples(examples, byte_tok, cutoff_len=prompt_len + 5)
    assert [i.id for i in items] == ["a"] and len(items[0]) == prompt_len + 5
    assert _masked_in_text(byte_tok, items[0]) == "a fai"
    assert (stats.dropped_long_prompt, stats.truncated, stats.num_formatted) == (1, 1, 1)


def _synthesis_record(tok: PreTrainedTokenizerFast) -> tuple[dict[str, Any], dict[str, str]]:
    texts = {"student1": "Step 1: 17 * 3 = 41.", "student2": "\n\nStep 2: 41 + 9 = 50.",
             "revise": "\n\nWait, let me re-check that.\n\n", "teacher": "17 * 3 = 51, and 51 + 9 = 60. Answer: 60"}
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 17 * 3 + 9?"}],
                                     add_generation_prompt=True, tokenize=False)

    def seg(source: str, key: str, with_ids: bool) -> dict[str, Any]:
        ids = tok.encode(texts[key], add_special_tokens=False)
        out = {"source": source, "text": texts[key], "num_tokens": len(ids)}
        return {**out, "token_ids": ids} if with_ids else out

    segments = [seg("student", "student1", True), seg("student", "student2", False),
                seg("revise", "revise", True), seg("teacher", "teacher", True)]
    # Generated ids end with the eos the teacher emitted; the decoded text (skip_special_tokens) does not.
    segments[-1]["token_ids"] = segments[-1]["token_ids"] + [tok.eos_token_id]
    segments[-1]["num_tokens"] += 1
    record = {"id": "q7", "sample_index": 2, "prompt": prompt, "response": "".join(texts.values()),
              "segments": segments, "policy": "motab"}
    return record, texts


def test_flawed_student_segments_are_masked(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    record, texts = _synthesis_record(tok)
    (example,), stats = read_examples(_write_jsonl(tmp_path / "synth.jsonl", [record]))
    assert example.prompt_rendered and example.id == "q7#2"

    plain = format_example(example, tok)
    # The rendered prompt is used as is (no second chat template around it).
    assert plain.input_ids[:plain.num_prompt_tokens].tolist() == tok.encode(record["prompt"], add_special_tokens=False)
    assert _masked_in_text(tok, plain) == record["response"] + tok.eos_token
    response_ids = plain.input_ids[plain.num_prompt_tokens:]
    assert int((response_ids == tok.eos_token_id).sum()) == 1  # the generated eos is not doubled

    (masked,), fstats = format_examples([example], tok, mask_flawed_student_segment=True)
    assert masked.input_ids.tolist() == plain.input_ids.tolist()  # same tokens, only the mask differs
    assert _masked_in_text(tok, masked) == texts["revise"] + texts["teacher"] + tok.eos_token
    student = sum(s["num_tokens"] if "token_ids" in s else len(tok.encode(s["text"], add_special_tokens=False))
                  for s in record["segments"][:2])
    assert fstats.masked_flawed_tokens == student
    assert int(plain.loss_mask.sum()) - int(masked.loss_mask.sum()) == student


def test_masking_is_a_no_op_without_a_revise_segment(byte_tok: PreTrainedTokenizerFast) -> None:
    record, texts = _synthesis_record(byte_tok)
    record["segments"] = [s for s in record["segments"] if s["source"] != "revise"]
    record["response"] = "".join(s["text"] for s in record["segments"])
    example = parse_record(record, where="r")
    item = format_example(example, byte_tok, mask_flawed_student_segment=True)
    assert _masked_in_text(byte_tok, item) == record["response"] + byte_tok.eos_token


# ---------------------------------------------------------------------------------------------- packing


@pytest.fixture(scope="module")
def gsm8k_tokenized(byte_tok: PreTrainedTokenizerFast) -> list[TokenizedExample]:
    examples, stats = read_examples(GSM8K)
    assert stats.num_examples == 1319 and stats.num_skipped == 0
    assert examples[0].prompt.startswith("Janet") and examples[0].response.startswith("Janet sells")
    items, _ = format_examples(examples, byte_tok)
    return items


def _documents(row: PackedRow) -> list[tuple[int, int]]:
    """(start, end) of each document of a row, from its segment ids."""
    seg = row.segment_ids
    return [(int(np.argmax(seg == k)), int(np.argmax(seg == k)) + int((seg == k).sum()))
            for k in range(1, int(seg.max()) + 1)]


def test_packing_invariants_on_gsm8k(gsm8k_tokenized: list[TokenizedExample]) -> None:
    L = SEQ_LEN
    rows, stats = pack_examples(gsm8k_tokenized, L, pad_id=256)
    assert stats.truncated == sum(len(e) > L for e in gsm8k_tokenized) > 0
    # Examples whose cut to L leaves no trained target are dropped and counted; all others are packed.
    expected = [e for e in gsm8k_tokenized if e.loss_mask[1:L].any()]
    assert stats.dropped_no_target == len(gsm8k_tokenized) - len(expected)
    assert stats.num_packed == len(expected) > 1250
    # Near-optimal fill: at least ceil(tokens / L) rows, and documents over L/2 cannot share a row.
    lengths = [min(len(e), L) for e in expected]
    lower_bound = max(-(-sum(lengths) // L), sum(n > L // 2 for n in lengths))
    assert stats.num_rows == len(rows) <= 1.02 * lower_bound
    assert any(r.segment_ids.max() > 1 for r in rows)  # rows do hold several documents

    by_tokens = {tuple(e.input_ids[:L].tolist()): e for e in gsm8k_tokenized}
    packed_docs: list[tuple[int, ...]] = []
    for row in rows:
        for key in BATCH_KEYS:
            assert getattr(row, key).shape == (L,)
        assert row.loss_mask.dtype == np.float32 and row.tokens.dtype == np.int32
        seg, pos = row.segment_ids, row.positions
        used = int((seg > 0).sum())
        # Documents 1..k, contiguous and increasing, padding only at the end.
        assert (np.diff(seg[:used]) >= 0).all() and (np.diff(seg[:used]) <= 1).all() and seg[0] == 1
        assert (seg[used:] == 0).all() and (row.tokens[used:] == 256).all()
        assert (row.targets[used:] == 0).all() and (row.loss_mask[used:] == 0).all()
        for start, end in _documents(row):
            assert (pos[start:end] == np.arange(end - start)).all()  # positions restart per document
            # Targets: the next token inside the document, nothing at its last position.
            assert (row.targets[start:end - 1] == row.tokens[start + 1:end]).all()
            assert row.targets[end - 1] == 0 and row.loss_mask[end - 1] == 0
            doc = tuple(row.tokens[start:end].tolist())
            example = by_tokens[doc]
            # The loss mask is the mask of the target token.
            assert (row.loss_mask[start:end - 1] == example.loss_mask[1:end - start]).all()
            packed_docs.append(doc)
    # Nothing lost or duplicated: the documents are the examples (cut to L where counted as truncated).
    assert collections.Counter(packed_docs) == collections.Counter(tuple(e.input_ids[:L].tolist()) for e in expected)
    assert stats.num_loss_tokens == int(sum(e.loss_mask[1:L].sum() for e in expected))


def test_packing_truncates_and_drops_targetless_examples() -> None:
    def ex(name: str, n: int, prompt: int) -> TokenizedExample:
        return TokenizedExample(name, np.arange(1, n + 1, dtype=np.int32),
                                np.array([0] * prompt + [1] * (n - prompt), np.uint8), prompt)

    examples = [ex("a", 4, 1), ex("b", 2, 1), ex("c", 9, 2), ex("d", 3, 3), ex("e", 7, 6), ex("f", 1, 0)]
    rows, stats = pack_examples(examples, 6)
    # c is cut to 6; e cut to 6 is prompt only and d is prompt only: no target; f has no next token.
    assert (stats.truncated, stats.dropped_no_target, stats.num_packed) == (2, 3, 3)
    assert len(rows) == 2  # best fit: [c(6)], [a(4), b(2)]
    assert rows[0].segment_ids.tolist() == [1] * 6
    assert rows[1].segment_ids.tolist() == [1, 1, 1, 1, 2, 2]
    assert rows[1].positions.tolist() == [0, 1, 2, 3, 0, 1]
    assert rows[1].targets.tolist() == [2, 3, 4, 0, 2, 0]
    assert rows[1].loss_mask.tolist() == [1, 1, 1, 0, 1, 0]


# --------------------------------------------------------------------------------------------- pipeline


def _numbered_dataset(num_rows: int, seq_len: int = 4) -> SFTDataset:
    """Rows whose tokens are all their own index, so batches show which rows they hold."""
    def row(i: int) -> PackedRow:
        full = np.full(seq_len, i, np.int32)
        return PackedRow(tokens=full, targets=full, loss_mask=np.ones(seq_len, np.float32),
                         segment_ids=np.ones(seq_len, np.int32), positions=np.arange(seq_len, dtype=np.int32))
    return SFTDataset([row(i) for i in range(num_rows)])


def _ids(batches: list[dict[str, np.ndarray]]) -> list[list[int]]:
    return [b["tokens"][:, 0].tolist() for b in batches]


def test_batches_are_deterministic_and_cover_each_epoch() -> None:
    data = _numbered_dataset(103)
    it = BatchIterator(data, 8, seed=3, num_epochs=3)
    assert (it.steps_per_epoch, it.total_steps) == (12, 36)
    run = list(it)
    assert len(run) == 36
    assert _ids(run) == _ids(list(BatchIterator(data, 8, seed=3, num_epochs=3)))
    assert _ids(run) != _ids(list(BatchIterator(data, 8, seed=4, num_epochs=3)))
    epochs = [sum(_ids(run[e * 12:(e + 1) * 12]), []) for e in range(3)]
    for rows in epochs:
        assert len(rows) == len(set(rows)) == 96  # each row at most once; the 7-row partial batch dropped
    assert epochs[0] != epochs[1]  # a new permutation per epoch
    ordered = sum(_ids(list(BatchIterator(data, 8, seed=3, shuffle=False))), [])
    assert ordered == list(range(96))


@pytest.mark.parametrize("k", [0, 5, 12, 17, 35])
def test_restored_iterator_continues_exactly(k: int) -> None:
    data = _numbered_dataset(103)
    full = _ids(list(BatchIterator(data, 8, seed=11, num_epochs=3)))
    it = BatchIterator(data, 8, seed=11, num_epochs=3)
    first = [next(it) for _ in range(k)]
    state = json.loads(json.dumps(it.state()))  # checkpoints store it as JSON
    resumed = BatchIterator(data, 8, seed=11, num_epochs=3)
    resumed.restore(state)
    assert _ids(first) + _ids(list(resumed)) == full
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(data, 8, seed=12, num_epochs=3).restore(state)


def test_process_slices_concatenate_to_the_global_batch(gsm8k_tokenized: list[TokenizedExample]) -> None:
    rows, _ = pack_examples(gsm8k_tokenized[:200], SEQ_LEN)
    data = SFTDataset(rows)
    global_run = list(BatchIterator(data, 8, seed=0, num_epochs=2))
    parts = [list(BatchIterator(data, 8, seed=0, num_epochs=2, process_index=p, process_count=2)) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(global_run) > 0
    for g, a, b in zip(global_run, parts[0], parts[1]):
        for key in BATCH_KEYS:
            assert a[key].shape == (4, SEQ_LEN)
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), g[key])


def test_build_sft_rows_end_to_end(byte_tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    record, _ = _synthesis_record(byte_tok)
    path = _write_jsonl(tmp_path / "mix.jsonl", [record, CHAT, {"prompt": "p", "response": "r"}])
    examples, _ = read_examples(path)
    rows, stats = build_sft_rows(examples, byte_tok, 256, mask_flawed_student_segment=True)
    assert stats.format.num_formatted == 3 and stats.format.masked_flawed_tokens > 0
    assert stats.pack.num_packed == 3 and stats.as_dict()["pack/num_rows"] == len(rows)
    batch = next(BatchIterator(SFTDataset(rows), 1, seed=0))
    assert set(batch) == set(BATCH_KEYS) and batch["tokens"].shape == (1, 256)


# ----------------------------------------------------------------------------------------------- errors


def test_malformed_and_invalid_lines_name_file_line_and_field(tmp_path: Path) -> None:
    good = {"prompt": "p", "response": "r"}
    bad_json = _write_jsonl(tmp_path / "bad.jsonl", [good, "", '{"prompt": "p", "response": ', good])
    with pytest.raises(InvalidRecordError, match=rf"{tmp_path / 'bad.jsonl'}:3: malformed JSON"):
        read_examples(bad_json)
    missing = _write_jsonl(tmp_path / "missing.jsonl", [good, {"prompt": "p"}])
    with pytest.raises(InvalidRecordError, match=rf"{tmp_path / 'missing.jsonl'}:2: missing field 'response'"):
        read_examples(missing)
    cases = [
        ({"id": "q", "prompt": "p", "response": "r", "segments": []}, "missing field 'sample_index'"),
        ({"id": "q", "sample_index": 0, "prompt": "p", "response": "ab",
          "segments": [{"source": "student", "text": "a"}]}, "do not concatenate"),
        ({"id": "q", "sample_index": 0, "prompt": "p", "response": "a",
          "segments": [{"source": "oracle", "text": "a"}]}, r"'segments\[0\].source'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, r"'messages\[0\]'"),
        ({"question": "q"}, "missing fields"),
        ({"input": "q", "output": 3}, "'output' must be a string"),
    ]
    for record, message in cases:
        with pytest.raises(InvalidRecordError, match=rf"f.jsonl:7: .*{message}"):
            parse_record(record, where="f.jsonl:7")


def test_skip_invalid_counts_skipped_records(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "response": "b"}, "not json", {"prompt": "p"},
                                                   "", {"problem": "c", "solution": "d"}, "[1, 2]"])
    examples, stats = read_examples(path, skip_invalid=True)
    assert [(e.prompt, e.response) for e in examples] == [("a", "b"), ("c", "d")]
    assert (stats.num_examples, stats.num_skipped) == (2, 3)
    assert stats.skipped_by_reason == {"malformed_json": 1, "invalid_record": 2}
    assert any(":3:" in e and "'response'" in e for e in stats.errors)
    limited, _ = read_examples(path, skip_invalid=True, limit=1)
    assert len(limited) == 1
    forced, _ = read_examples(path, skip_invalid=True, fields=("problem", "solution"))
    assert [(e.prompt, e.response) for e in forced] == [("c", "d")]


def test_parquet_round_trip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    records = [{"id": "p0", "prompt": "2 + 2?", "response": "4"}, {"id": "p1", "prompt": "Ünï?", "response": "ü"}]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    examples, stats = read_examples(path)
    assert [(e.id, e.prompt, e.response) for e in examples] == [(r["id"], r["prompt"], r["response"]) for r in records]
    chat = tmp_path / "chat" / "part-0.parquet"
    chat.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([CHAT]), chat)
    (example,), _ = read_examples(chat.parent)  # a folder of shards
    assert example.prompt == CHAT["messages"][:-1] and example.response == CHAT["messages"][-1]["content"]
    pq.write_table(pa.Table.from_pylist(records + [{"id": "p2", "prompt": "x", "response": None}]), path)
    with pytest.raises(InvalidRecordError, match=r"train.parquet: row 2: field 'response'"):
        read_examples(path)


def test_optional_sources_fail_clearly(tmp_path: Path) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # tests/conftest.py
    with pytest.raises(EnvironmentProblem, match="HF_HUB_OFFLINE"):
        read_examples("hf:openai/gsm8k:main@train")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ImportError, match="pip install datasets"):
            read_examples(f"hf:{tmp_path}")  # a local folder: offline is fine, the package is missing
    if importlib.util.find_spec("tensorflow_datasets") is None:
        with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
            read_examples("tfds:gsm8k@test")
    with pytest.raises(MissingInputError, match="no such file"):  # also a FileNotFoundError
        read_examples(tmp_path / "absent.jsonl")
