"""A small byte-level BPE tokenizer with ChatML special tokens, built in code (no files, no network).

Tiny demo and test models use it: 256 byte tokens (every text is encodable), optional merges, then
`<|endoftext|>` (bos/pad), `<|im_start|>` and `<|im_end|>` (eos) and a ChatML chat template.
"""

from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from motab_jax.text.qwen import QWEN_CHAT_TEMPLATE, bytes_to_unicode


def byte_level_tokenizer(merges: Sequence[tuple[str, str]] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the GPT-2 byte alphabet; `merges` are pairs of alphabet strings ("Ġ", "t").

    Ids: bytes 0..255, then one id per merge, then `<|endoftext|>`, `<|im_end|>`, `<|im_start|>`.
    """
    alphabet = bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    for a, b in merges:
        if a not in vocab or b not in vocab:
            raise ValueError(f"merge ({a!r}, {b!r}) uses a token that is not in the vocabulary yet")
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast
