"""Tokenizing an `Example` into (input_ids, loss_mask) for supervised fine-tuning.

Layout: prompt tokens (mask 0) then response tokens + eos (mask 1). The prompt goes through the
tokenizer's chat template with `add_generation_prompt=True`, unless the example says it is already
rendered (synthesis records), so the template is never applied twice.

Synthesis records are tokenized segment by segment (each segment's `token_ids` when present: the exact
tokens the student / teacher generated), so segment boundaries are exact token boundaries. With
`mask_flawed_student_segment=True` the student segments before the (last) revise segment — the flawed
exploration the revise marker rejects — get mask 0: the model still sees them as context but is not
trained to produce them.

Special tokens in a response. A response's ids hold no special token of the tokenizer
(`text.special_token_mask`: bos/eos/pad and added tokens flagged special; Qwen3's `<think>` is text) and end with
exactly one `eos_token_id`, which formatting appends. Any special id found in a segment's `token_ids` or in an
encoded response text is dropped: an end-of-sequence a breaching step ended with (records written before the
records dropped it themselves, `motab.stitching`), a `<|im_start|>` a model sampled, a literal "<|im_end|>" in a
dataset's text. Trained with mask 1 in the middle of a response, such an id would teach the model to stop or to
open a new turn there. Drops are counted in `FormatStats.dropped_special_tokens` (a special id ending the response,
such as the end-of-sequence a trajectory ended with, is replaced by the appended eos and not counted). A chat format whose replies carry special tokens inside them (gpt-oss's
harmony channels) is therefore not trainable here as a student.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from motab_jax.data.sources import Example
from motab_jax.errors import MotabInputError
from motab_jax.text import special_token_mask

__all__ = ["FormatStats", "TokenizedExample", "format_example", "format_examples", "render_prompt"]


@dataclass(frozen=True)
class TokenizedExample:
    """`input_ids [T]` int32 and `loss_mask [T]` uint8 (1 on trained response tokens and the eos)."""

    id: str
    input_ids: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T] uint8
    num_prompt_tokens: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class FormatStats:
    num_examples: int = 0  # examples given
    num_formatted: int = 0  # examples returned
    dropped_long_prompt: int = 0  # prompt alone fills cutoff_len: no response token would be left
    truncated: int = 0  # response cut at cutoff_len (its eos is lost)
    num_tokens: int = 0
    num_loss_tokens: int = 0
    masked_flawed_tokens: int = 0  # student tokens before a revise segment, masked out
    dropped_special_tokens: int = 0  # special ids dropped from inside responses (see the module docstring)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # No bos/eos from the tokenizer's post-processor: the chat template and the eos appended below
    # already place every special token.
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def render_prompt(example: Example, tokenizer: Any, *, apply_chat_template: bool = True,
                  chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The prompt text the model sees: as is when already rendered, else through the chat template.

    A text prompt becomes one user message. `apply_chat_template=False` uses text prompts raw
    (base models without a template); chat-message prompts then raise.
    """
    if example.prompt_rendered:
        if not isinstance(example.prompt, str):
            raise MotabInputError(f"{example.origin or example.id}: a rendered prompt must be text")
        return example.prompt
    if not apply_chat_template:
        if not isinstance(example.prompt, str):
            raise MotabInputError(f"{example.origin or example.id}: chat messages need apply_chat_template=True")
        return example.prompt
    if not getattr(tokenizer, "chat_template", None):
        raise MotabInputError("the tokenizer has no chat template; set one, or pass apply_chat_template=False "
                         "to use text prompts as they are")
    messages = [{"role": "user", "content": example.prompt}] if isinstance(example.prompt, str) else example.prompt
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **dict(chat_template_kwargs or {}))


def _special_ids(tokenizer: Any) -> frozenset[int]:
    return frozenset(np.flatnonzero(special_token_mask(tokenizer)).tolist())


def _response(example: Example, tokenizer: Any, mask_flawed: bool) -> tuple[list[int], list[int]]:
    """Response ids and their mask, before the eos (special ids not yet dropped)."""
    if not example.segments:
        ids = _encode(tokenizer, example.response)
        return ids, [1] * len(ids)
    sources = [s["source"] for s in example.segments]
    # Everything student-written before the last revise marker was rejected by it.
    last_revise = max((i for i, s in enumerate(sources) if s == "revise"), default=-1) if mask_flawed else -1
    ids: list[int] = []
    mask: list[int] = []
    for i, seg in enumerate(example.segments):
        seg_ids = list(seg["token_ids"]) if seg.get("token_ids") is not None else _encode(tokenizer, seg["text"])
        ids += seg_ids
        mask += [0 if (i < last_revise and seg["source"] == "student") else 1] * len(seg_ids)
    return ids, mask


def _format(example: Example, tokenizer: Any, mask_flawed: bool, cutoff_len: int | None, apply_chat_template: bool,
            chat_template_kwargs: Mapping[str, Any] | None, special: frozenset[int]
            ) -> tuple[TokenizedExample | None, int, int]:
    """The formatted example (None: prompt too long), its length before truncation and the special ids dropped from
    inside its response."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MotabInputError("the tokenizer has no eos token; responses must end with one")
    prompt_ids = _encode(tokenizer, render_prompt(example, tokenizer, apply_chat_template=apply_chat_template,
                                                  chat_template_kwargs=chat_template_kwargs))
    if cutoff_len is not None and len(prompt_ids) >= cutoff_len:
        return None, len(prompt_ids), 0
    response_ids, response_mask = _response(example, tokenizer, mask_flawed)
    # A special id ending the response (the end-of-sequence a synthesis trajectory ended with) is replaced by the eos
    # appended below, not trained twice.
    if response_ids and (response_ids[-1] == eos or response_ids[-1] in special):
        response_ids, response_mask = response_ids[:-1], response_mask[:-1]
    kept = [i for i, t in enumerate(response_ids) if t not in special and t != eos]
    dropped = len(response_ids) - len(kept)
    response_ids = [response_ids[i] for i in kept] + [eos]
    response_mask = [response_mask[i] for i in kept] + [1]
    ids = np.asarray(prompt_ids + response_ids, np.int32)
    mask = np.asarray([0] * len(prompt_ids) + response_mask, np.uint8)
    full_len = len(ids)
    if cutoff_len is not None:
        ids, mask = ids[:cutoff_len], mask[:cutoff_len]
    item = TokenizedExample(id=example.id, input_ids=ids, loss_mask=mask, num_prompt_tokens=len(prompt_ids))
    return item, full_len, dropped


def format_example(example: Example, tokenizer: Any, *, mask_flawed_student_segment: bool = False,
                   cutoff_len: int | None = None, apply_chat_template: bool = True,
                   chat_template_kwargs: Mapping[str, Any] | None = None) -> TokenizedExample | None:
    """`example` as token ids and loss mask; None when the prompt alone has >= `cutoff_len` tokens
    (no response token would fit).

    `cutoff_len` truncates prompt + response + eos to that many tokens (the response tail goes).
    """
    return _format(example, tokenizer, mask_flawed_student_segment, cutoff_len, apply_chat_template,
                   chat_template_kwargs, _special_ids(tokenizer))[0]


def format_examples(examples: Iterable[Example], tokenizer: Any, *, mask_flawed_student_segment: bool = False,
                    cutoff_len: int | None = None, apply_chat_template: bool = True,
                    chat_template_kwargs: Mapping[str, Any] | None = None
                    ) -> tuple[list[TokenizedExample], FormatStats]:
    """`format_example` over `examples`, counting drops, truncations, masked tokens and dropped special ids."""
    stats = FormatStats()
    out: list[TokenizedExample] = []
    special = _special_ids(tokenizer)
    for example in examples:
        stats.num_examples += 1
        item, full_len, dropped = _format(example, tokenizer, mask_flawed_student_segment, cutoff_len,
                                          apply_chat_template, chat_template_kwargs, special)
        stats.dropped_special_tokens += dropped
        if item is None:
            stats.dropped_long_prompt += 1
            continue
        stats.truncated += int(full_len > len(item))
        stats.num_tokens += len(item)
        loss_tokens = int(item.loss_mask.sum())
        stats.num_loss_tokens += loss_tokens
        if mask_flawed_student_segment and example.segments:
            stats.masked_flawed_tokens += len(item) - item.num_prompt_tokens - loss_tokens
        out.append(item)
    stats.num_formatted = len(out)
    return out, stats
