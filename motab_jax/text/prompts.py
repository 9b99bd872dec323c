"""How a question becomes a prompt: one place, so synthesis, training, distillation and evaluation prompt
the models identically."""

from __future__ import annotations

from typing import Any, Literal

PromptFormat = Literal["chat", "raw"]


def question_content(question: str, instruction: str = "") -> str:
    """The user message: the question, then the instruction (e.g. "put your final answer within \\boxed{}")."""
    return f"{question}\n{instruction}" if instruction else question


def question_prompt(tokenizer: Any, question: str, instruction: str = "", *, prompt_format: PromptFormat = "chat",
                    system_prompt: str = "") -> tuple[str, list[int]]:
    """(text, token ids) the model is prompted with.

    "chat": the content as one user message (after an optional system message) through the tokenizer's chat
    template with the generation prompt; "raw": the content as plain text, with the tokenizer's own special
    tokens (e.g. a BOS) added.
    """
    content = question_content(question, instruction)
    if prompt_format == "chat":
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": content})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if prompt_format == "raw":
        return content, list(tokenizer(content)["input_ids"])
    raise ValueError(f"prompt_format={prompt_format!r}; accepted: 'chat', 'raw'")
