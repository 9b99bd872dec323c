"""Parity with Hugging Face transformers (PyTorch) on the same weights.

The golden fixtures were written by transformers + torch (tests/fixtures/make_golden.py), so these run
without torch; the live tests rebuild fresh random models with transformers when torch is installed.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import motab_jax
from fixtures.make_golden import FIXTURES, GOLDEN_DIR, TOKENIZER_SIZE, VOCAB_ROWS

TOL = 1e-4  # float32, max |logit difference|


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_golden_logits_match_transformers(name):
    folder = GOLDEN_DIR / name
    expected = np.load(folder / "expected_logits.npz")
    model, tokenizer = motab_jax.load(folder, dtype="float32")
    assert len(tokenizer) == TOKENIZER_SIZE
    logits = model(jnp.asarray(expected["input_ids"]))
    assert logits.dtype == jnp.float32
    # Logits cover the tokenizer's vocabulary; the padded embedding rows are dropped.
    assert logits.shape == (*expected["input_ids"].shape, TOKENIZER_SIZE)
    np.testing.assert_allclose(np.asarray(logits), expected["logits"][..., :TOKENIZER_SIZE], atol=TOL, rtol=0)
    assert np.abs(expected["logits"]).max() > 1.0  # the reference is not degenerate


@pytest.mark.parametrize("name", ["llama_tied", "qwen3_untied"])
def test_all_embedding_rows_when_asked(name):
    folder = GOLDEN_DIR / name
    expected = np.load(folder / "expected_logits.npz")
    model, _ = motab_jax.load(folder, dtype="float32", logits_vocab_size=0)
    logits = np.asarray(model(jnp.asarray(expected["input_ids"])))
    assert logits.shape[-1] == VOCAB_ROWS
    np.testing.assert_allclose(logits, expected["logits"], atol=TOL, rtol=0)


def _old_style_config(folder):
    """Rewrite config.json the way hub checkpoints store RoPE (rope_theta + rope_scaling)."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_live_parity_with_transformers(name, tmp_path):
    torch = pytest.importorskip("torch")
    from fixtures.make_golden import build_hf_model, build_tokenizer, reference_logits, sample_input_ids

    hf_model = build_hf_model(name, seed=7)
    hf_model.save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    _old_style_config(tmp_path)
    ids = sample_input_ids(seed=3, batch=3, length=40)
    # transformers must read the old-style config to the same model we do.
    import transformers

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    expected = reference_logits(reloaded, ids)
    np.testing.assert_allclose(expected, reference_logits(hf_model, ids), atol=1e-6)
    model, _ = motab_jax.load(tmp_path, dtype="float32", logits_vocab_size=0)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), expected, atol=TOL, rtol=0)


def test_bfloat16_policy_close_to_float32():
    folder = GOLDEN_DIR / "qwen3_untied"
    expected = np.load(folder / "expected_logits.npz")
    model, _ = motab_jax.load(folder, dtype="bfloat16")
    assert model.embed[...].dtype == jnp.bfloat16
    logits = model(jnp.asarray(expected["input_ids"]))
    assert logits.dtype == jnp.float32
    ref = expected["logits"][..., :TOKENIZER_SIZE]
    err = np.abs(np.asarray(logits) - ref).max()
    assert err < 0.15 * np.abs(ref).max(), err
    # Mixed policy: float32 master weights, bfloat16 compute.
    mixed, _ = motab_jax.load(folder, dtype="float32", compute_dtype="bfloat16")
    assert mixed.embed[...].dtype == jnp.float32
    assert np.abs(np.asarray(mixed(jnp.asarray(expected["input_ids"]))) - ref).max() < 0.15 * np.abs(ref).max()


def test_attention_kernels_agree():
    folder = GOLDEN_DIR / "llama3_untied"
    expected = np.load(folder / "expected_logits.npz")
    ids = jnp.asarray(expected["input_ids"])
    for impl in ("xla", "jax"):
        model, _ = motab_jax.load(folder, dtype="float32", attention_impl=impl)
        np.testing.assert_allclose(np.asarray(model(ids)), expected["logits"][..., :TOKENIZER_SIZE], atol=TOL)


def test_remat_gives_same_gradients():
    from flax import nnx

    folder = GOLDEN_DIR / "qwen2_tied"
    ids = jnp.asarray(np.load(folder / "expected_logits.npz")["input_ids"])
    grads = []
    for remat in ("none", "full", "dots"):
        model, _ = motab_jax.load(folder, dtype="float32", remat=remat)
        graphdef, state = nnx.split(model)

        def loss(state):
            logits = nnx.merge(graphdef, state)(ids)
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        grads.append(jax.jit(jax.grad(loss))(state))
    for other in grads[1:]:
        for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(other)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
