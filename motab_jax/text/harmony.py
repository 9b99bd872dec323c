"""The harmony chat format of gpt-oss: rendering prompts, the stop set, and the final answer of a reply.

A conversation is `<|start|>{role}<|message|>{content}<|end|>` per message. The first message is the
`system` message harmony builds from settings (identity, knowledge cutoff, optional date, the reasoning level
low / medium / high, the valid channels); our `system` role becomes harmony's `developer` message
("# Instructions"), as in gpt-oss's own chat template. The generation prompt is `<|start|>assistant`; the model
answers on channels: `analysis` (its reasoning), then `<|start|>assistant<|channel|>final<|message|>` and the
answer, ended by `<|return|>`. `final_text` keeps only the final channel, as `</think>` is stripped for Qwen3.
A run's reasoning level (`teacher.reasoning_effort` / `student.reasoning_effort`) becomes the chat template's
default (`with_reasoning_effort`), so every prompt rendered for that model carries it.
The tests check the rendering token for token against `openai-harmony`.
"""

from __future__ import annotations

import re
from typing import Literal

ReasoningLevel = Literal["low", "medium", "high"]
REASONING_LEVELS: tuple[str, ...] = ("low", "medium", "high")
DEFAULT_REASONING: ReasoningLevel = "medium"
# gpt-oss's generation_config eos set: <|return|> (a final answer), <|endoftext|>, <|call|> (a tool call).
# <|end|> (200007) ends every message, the analysis included, so it is not a stop token.
HARMONY_STOP_TOKENS: tuple[int, ...] = (200002, 199999, 200012)
_SYSTEM = ("You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06")
_CHANNELS = "# Valid channels: analysis, commentary, final. Channel must be included for every message."


def harmony_chat_template(reasoning: ReasoningLevel = DEFAULT_REASONING, date: str | None = None) -> str:
    """A Jinja chat template rendering the harmony format. `reasoning_effort` and `date_string` passed to
    `apply_chat_template` override the defaults given here (a date is left out unless given, so prompts are
    reproducible)."""
    if reasoning not in REASONING_LEVELS:
        raise ValueError(f"reasoning={reasoning!r}; accepted: {REASONING_LEVELS}")
    date_default = f"'{date}'" if date else "none"
    return (
        "{%- set effort = reasoning_effort if reasoning_effort is defined and reasoning_effort else '"
        + reasoning + "' -%}"
        "{%- set day = date_string if date_string is defined and date_string else " + date_default + " -%}"
        "<|start|>system<|message|>" + _SYSTEM.replace("\n", "{{ '\\n' }}")
        + "{%- if day %}{{ '\\nCurrent date: ' + day }}{% endif %}"
        "{{ '\\n\\nReasoning: ' + effort + '\\n\\n' }}" + _CHANNELS + "<|end|>"
        "{%- for m in messages -%}"
        "{%- if m['role'] in ('system', 'developer') -%}"
        "{{ '<|start|>developer<|message|># Instructions\\n\\n' + m['content'] + '<|end|>' }}"
        "{%- elif m['role'] == 'user' -%}"
        "{{ '<|start|>user<|message|>' + m['content'] + '<|end|>' }}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{{ '<|start|>assistant<|channel|>final<|message|>' + m['content'] + '<|end|>' }}"
        "{%- else -%}{{ raise_exception('harmony: unsupported role ' + m['role']) }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"
    )


# Prepended to a harmony chat template: the run's reasoning level when `apply_chat_template` is given none. gpt-oss's
# own template (and ours) fall back to "medium" only when `reasoning_effort` is undefined, so this default comes
# first and an explicit `reasoning_effort=` still wins. Jinja's top-level `set` inside `if` is seen by the rest of
# the template, its macros included.
_EFFORT_DEFAULT = re.compile(r"^\{%- if reasoning_effort is not defined or not reasoning_effort %\}\{%- set "
                             r"reasoning_effort = '\w+' %\}\{%- endif %\}")


def with_reasoning_effort(tokenizer, level: str):
    """`tokenizer` whose chat template renders the harmony system message with reasoning `level` unless a call
    passes `reasoning_effort=` itself (changed in place and returned). Tokenizers that do not speak harmony, or
    have no chat template, are returned unchanged: only gpt-oss models have a reasoning level."""
    if level not in REASONING_LEVELS:
        raise ValueError(f"reasoning_effort={level!r}; accepted: {REASONING_LEVELS}")
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not is_harmony_tokenizer(tokenizer):
        return tokenizer
    tokenizer.chat_template = (f"{{%- if reasoning_effort is not defined or not reasoning_effort %}}{{%- set "
                               f"reasoning_effort = '{level}' %}}{{%- endif %}}" + _EFFORT_DEFAULT.sub("", template))
    return tokenizer


# What follows a generation prompt when the reply starts in the analysis channel (the teacher reading the student's
# solution as its own reasoning, in text-level synthesis).
HARMONY_ANALYSIS = "<|channel|>analysis<|message|>"
# A message boundary inside one reply: <|end|> then the next assistant header (channel, optional constraint).
_BOUNDARY = re.compile(r"<\|end\|>\s*<\|start\|>assistant(?:<\|channel\|>\w+)?(?:\s*<\|constrain\|>\S*?)?<\|message\|>")
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")


def plain_text(reply: str) -> str:
    """A harmony reply decoded WITH its special tokens -> plain text for a student that does not speak harmony:
    each message boundary (analysis -> final) becomes a paragraph break, other special tokens are dropped."""
    return _SPECIAL.sub("", _BOUNDARY.sub("\n\n", reply))


def decode_reply(tokenizer, ids: list[int]) -> str:
    """Text of generated `ids`: special tokens dropped; for a harmony tokenizer channel headers become paragraph
    breaks (`plain_text`) instead of leaking "assistantfinal" into the text."""
    if is_harmony_tokenizer(tokenizer):
        return plain_text(tokenizer.decode(ids, skip_special_tokens=False))
    return tokenizer.decode(ids, skip_special_tokens=True)


# The final channel's header, with the special tokens kept or (decode(..., skip_special_tokens=True), what the
# engine's completions hold) dropped: "analysis...<reasoning>...assistantfinal<answer>".
_FINAL_KEPT = re.compile(r"<\|channel\|>final(?:\s*<\|constrain\|>\S*)?<\|message\|>")
_END_KEPT = re.compile(r"<\|(?:return|end|call)\|>")


def final_text(reply: str) -> str:
    """The text of a gpt-oss reply's last `final` channel message; a reply still in its analysis (no final
    channel, e.g. cut off by the token budget) has no final text: "". Text that is not a harmony reply is
    returned unchanged."""
    kept = list(_FINAL_KEPT.finditer(reply))
    if kept:
        tail = reply[kept[-1].end():]
        end = _END_KEPT.search(tail)
        return tail if end is None else tail[:end.start()]
    if reply.startswith("<|channel|>analysis"):
        return ""
    if reply.startswith("analysis"):  # special tokens dropped
        index = reply.rfind("assistantfinal")
        return "" if index < 0 else reply[index + len("assistantfinal"):]
    return reply


def is_harmony_tokenizer(tokenizer) -> bool:
    """Whether `tokenizer` speaks harmony (has its channel token)."""
    try:
        return tokenizer.convert_tokens_to_ids("<|channel|>") not in (None, tokenizer.unk_token_id)
    except (AttributeError, KeyError, TypeError):
        return False
