"""Attention kernels against a float64 NumPy reference (values and gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import motab_jax
from fixtures.make_golden import GOLDEN_DIR, TOKENIZER_SIZE
from motab_jax.models.attention import AttentionMask, attention, resolve_impl


def _reference(q, k, v, segments):
    """Causal (and same-segment) softmax attention with GQA, in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    group = h // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    allowed = np.tril(np.ones((t, t), bool))[None, None]
    if segments is not None:
        allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
    scores = np.where(allowed, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


def _inputs(length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, length, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, length, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, length, 2, 16)), jnp.float32)
    segments = np.asarray([[1] * 50 + [2] * (length - 50), [3] * (length - 7) + [4] * 7], np.int32)
    return q, k, v, segments


@pytest.mark.parametrize("impl", ["xla", "jax", "splash", "pallas_gpu"])
@pytest.mark.parametrize("packed", [False, True])
def test_kernels_match_float64_reference(impl, packed):
    q, k, v, segments = _inputs(128)
    segments = segments if packed else None
    index = jnp.broadcast_to(jnp.arange(128), (2, 128))
    seg = None if segments is None else jnp.asarray(segments)
    mask = AttentionMask(index, index, seg, seg, self_attention=True)
    np.testing.assert_allclose(np.asarray(attention(q, k, v, mask, impl)), _reference(q, k, v, segments), atol=1e-5)
    # Gradients through the kernel (splash and pallas_gpu have their own backward passes) equal the XLA
    # path's. pallas_gpu runs in Pallas interpret mode here; GQA: 4 query heads over 2 KV heads.
    grad = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask, impl))), argnums=(0, 1, 2))
    want = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask, "xla"))), argnums=(0, 1, 2))
    for got, ref in zip(grad(q, k, v), want(q, k, v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)


def test_splash_inside_the_model_matches_reference_path():
    folder = GOLDEN_DIR / "qwen3_untied"
    ids = jnp.asarray(np.random.default_rng(0).integers(0, TOKENIZER_SIZE, (2, 128)), jnp.int32)
    splash, _ = motab_jax.load(folder, dtype="float32", attention_impl="splash")
    reference, _ = motab_jax.load(folder, dtype="float32", attention_impl="xla")
    np.testing.assert_allclose(np.asarray(splash(ids)), np.asarray(reference(ids)), atol=1e-4)
    # Lengths the kernel does not tile (and cached decoding) fall back to the generic kernel.
    odd = ids[:, :37]
    np.testing.assert_allclose(np.asarray(splash(odd)), np.asarray(reference(odd)), atol=1e-4)


def test_pallas_gpu_inside_the_model_matches_reference_path():
    folder = GOLDEN_DIR / "qwen3_untied"
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, TOKENIZER_SIZE, (2, 64)), jnp.int32)
    # Packed rows as SFT lays them out: segment ids, RoPE positions restarting per segment, padding (id 0).
    segments = np.asarray([[1] * 20 + [2] * 30 + [0] * 14, [1] * 64], np.int32)
    positions = np.concatenate([np.r_[np.arange(20), np.arange(30), np.arange(14)][None], np.arange(64)[None]])
    segments, positions = jnp.asarray(segments), jnp.asarray(positions, jnp.int32)
    pallas, _ = motab_jax.load(folder, dtype="float32", attention_impl="pallas_gpu")
    reference, _ = motab_jax.load(folder, dtype="float32", attention_impl="xla")
    np.testing.assert_allclose(np.asarray(pallas(ids, positions, segments)),
                               np.asarray(reference(ids, positions, segments)), atol=1e-4)
    assert "pallas_call" in str(jax.make_jaxpr(lambda t: pallas(t, positions, segments))(ids))  # no fallback
    # Lengths the kernel does not tile (not a multiple of 16) fall back to the generic kernel.
    odd = ids[:, :37]
    np.testing.assert_allclose(np.asarray(pallas(odd)), np.asarray(reference(odd)), atol=1e-4)


def test_auto_picks_flash_kernels_on_gpu_and_keeps_other_backends():
    def pick(impl="auto", backend="gpu", self_attention=True, segmented=True, length=32768, head_dim=128,
             dtype=jnp.bfloat16):
        return resolve_impl(impl, self_attention=self_attention, segmented=segmented, length=length,
                            head_dim=head_dim, dtype=dtype, backend=backend)

    assert pick() == "pallas_gpu"  # packed training rows: never dense [T, T] scores on GPU
    assert pick(segmented=False) == "cudnn"
    assert pick(segmented=False, dtype=jnp.float32) == "pallas_gpu"  # cuDNN flash is bf16/fp16 only
    assert pick(segmented=False, head_dim=256) == "pallas_gpu"  # beyond what every cuDNN version takes
    assert pick(self_attention=False) == "jax"  # reads a KV cache
    assert pick(length=32760) == "jax" and pick(head_dim=8) == "jax"  # shapes the kernel cannot tile
    assert pick(length=48) == "pallas_gpu"  # 16-token tiles
    assert pick("pallas_gpu", backend="cpu") == "pallas_gpu"  # explicit: Pallas interpret mode off GPU
    assert pick("cudnn") == "jax"  # cuDNN flash takes no segment ids
    assert pick(backend="tpu") == "splash" and pick(backend="tpu", length=100) == "jax"
    assert pick(backend="cpu") == "jax"
    with pytest.raises(ValueError, match="accepted"):
        pick("flash3")


def test_unknown_kernel_is_rejected():
    with pytest.raises(ValueError, match="accepted"):
        motab_jax.load(GOLDEN_DIR / "llama_tied", dtype="float32", attention_impl="flash3")
