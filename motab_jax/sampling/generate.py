"""`generate`: prompts in, completions out (text, token ids, optional log-probabilities)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from tqdm.auto import tqdm

from motab_jax.models.transformer import Decoder
from motab_jax.sampling.rules import make_rule

Prompt = str | Sequence[int] | Sequence[dict[str, str]]


@dataclasses.dataclass
class Completion:
    text: str  # decoded without special tokens (the stop token is not part of it)
    token_ids: list[int]  # generated ids, the stop token included when one ended the completion
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)
    logprobs: list[float] | None = None  # log pi(token) at temperature 1, per generated id


def encode_prompt(tokenizer: Any, prompt: Prompt, chat_template: bool) -> list[int]:
    """Token ids for a prompt given as text, as chat messages, or already as ids."""
    if isinstance(prompt, str):
        if chat_template:
            return encode_prompt(tokenizer, [{"role": "user", "content": prompt}], True)
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    items = list(prompt)
    if items and isinstance(items[0], dict):
        return list(tokenizer.apply_chat_template(items, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    if not all(isinstance(t, (int,)) or hasattr(t, "__index__") for t in items):
        raise TypeError("a prompt must be a string, a list of chat messages or a list of token ids")
    return [int(t) for t in items]


def completion(tokens: Sequence[int], logprobs: Sequence[float] | None, hit_stop: bool, tokenizer: Any) -> Completion:
    """A completion from generated ids (the stop token last when `hit_stop`)."""
    ids = [int(t) for t in tokens]
    text_ids = ids[:-1] if hit_stop else ids
    return Completion(text=tokenizer.decode(text_ids, skip_special_tokens=True) if tokenizer is not None else "",
                      token_ids=ids, finish_reason="stop" if hit_stop else "length",
                      logprobs=[float(x) for x in logprobs] if logprobs is not None else None)


def default_stop_tokens(model: Decoder, tokenizer: Any) -> list[int]:
    stops = set(model.config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    return sorted(stops)


def generate(model: Decoder, tokenizer: Any, prompts: Sequence[Prompt], *, n: int = 1, temperature: float = 0.6,
             top_p: float = 0.95, top_k: int = 0, max_new_tokens: int = 1024, seed: int = 0,
             stop_tokens: Sequence[int] | None = None, batch_size: int = 64, chat_template: bool = False,
             return_logprobs: bool = False, progress: bool = False) -> list[list[Completion]]:
    """Sample `n` completions of each prompt; returns one list of `n` completions per prompt.

    Prompts are strings (raw text, or a user message when `chat_template`), chat message lists (always
    rendered with the tokenizer's chat template and a generation prompt) or token-id lists. Rows run on the
    slot engine with continuous batching over `batch_size` slots (a finished row is replaced at once). Sample j
    of prompt i is seeded by (seed, i * n + j), so results do not depend on `batch_size`. Temperature 0 is
    greedy decoding; `top_k` = 0 and `top_p` = 1 disable truncation.
    """
    from motab_jax.motab.generation import GenerationConfig, generate_rows  # the engine imports this module

    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    rule = make_rule(temperature, top_p, top_k)
    stops = list(stop_tokens) if stop_tokens is not None else default_stop_tokens(model, tokenizer)
    encoded = [encode_prompt(tokenizer, p, chat_template) for p in prompts]
    rows = [(i, j) for i in range(len(encoded)) for j in range(n)]
    results: list[list[Completion | None]] = [[None] * n for _ in encoded]
    stream = generate_rows(model, [encoded[i] for i, _ in rows], [i * n + j for i, j in rows], rule=rule,
                           max_new_tokens=max_new_tokens, stop_tokens=stops, seed=seed,
                           config=GenerationConfig(num_slots=batch_size))
    for index, row in tqdm(stream, total=len(rows), desc="generate", unit="row", disable=not progress):
        i, j = rows[index]
        results[i][j] = completion(row.tokens, row.logprobs if return_logprobs else None, row.hit_stop, tokenizer)
    return results  # type: ignore[return-value]
