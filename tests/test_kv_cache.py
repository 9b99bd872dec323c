"""KV cache semantics: prefill/decode/chunk/rewind/ragged all equal the cache-free forward pass."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import motab_jax
from fixtures.make_golden import GOLDEN_DIR, TOKENIZER_SIZE

TOL = 2e-5
MAX_LEN = 48


@functools.lru_cache(maxsize=None)
def _model(name: str):
    model, _ = motab_jax.load(GOLDEN_DIR / name, dtype="float32")
    return model


@functools.lru_cache(maxsize=None)
def _jitted_extend(name: str, logits: str):
    """extend() as a pure jitted function of (params, tokens, cache, num_valid), cache donated."""
    graphdef, state = nnx.split(_model(name))

    @functools.partial(jax.jit, donate_argnums=2)
    def run(state, tokens, cache, num_valid):
        return nnx.merge(graphdef, state).extend(tokens, cache, num_valid, logits=logits)

    return functools.partial(run, state)


def _tokens(seed: int, batch: int, length: int) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, TOKENIZER_SIZE, (batch, length)), jnp.int32)


def _full(name, tokens):
    return np.asarray(_model(name)(tokens))


def _extend(name, tokens, cache, num_valid=None, logits="all"):
    if num_valid is None:
        num_valid = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    return _jitted_extend(name, logits)(tokens, cache, num_valid)


@pytest.mark.parametrize("name", ["llama3_untied", "qwen3_untied", "qwen2_tied"])
def test_prefill_then_decode_equals_full_forward(name):
    tokens = _tokens(0, 2, 20)
    full = _full(name, tokens)
    cache = _model(name).init_cache(2, MAX_LEN, "float32")
    logits, cache = _extend(name, tokens[:, :8], cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, :8], atol=TOL)
    for t in range(8, 20):
        logits, cache = _extend(name, tokens[:, t:t + 1], cache)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, t], atol=TOL)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [20, 20])


def test_chunk_scoring_equals_single_steps():
    name = "qwen3_untied"
    tokens = _tokens(1, 3, 18)
    cache = _model(name).init_cache(3, MAX_LEN, "float32")
    _, cache = _extend(name, tokens[:, :10], cache)
    # A copy of the cache: the jitted calls donate (and so invalidate) their cache argument.
    stepwise_cache = jax.tree.map(jnp.copy, cache)
    chunk_logits, cache = _extend(name, tokens[:, 10:18], cache)
    for t in range(10, 18):
        step_logits, stepwise_cache = _extend(name, tokens[:, t:t + 1], stepwise_cache)
        np.testing.assert_allclose(np.asarray(chunk_logits[:, t - 10]), np.asarray(step_logits[:, 0]), atol=TOL)
    np.testing.assert_allclose(np.asarray(cache.keys), np.asarray(stepwise_cache.keys), atol=TOL)


def test_rewind_and_redecode_equals_never_going_forward():
    name = "llama3_untied"
    prefix, wrong, right = _tokens(2, 2, 12), _tokens(3, 2, 6), _tokens(4, 2, 5)
    cache = _model(name).init_cache(2, MAX_LEN, "float32")
    _, cache = _extend(name, prefix, cache)
    _, cache = _extend(name, wrong, cache)  # a branch that is then abandoned
    assert np.asarray(cache.lengths).tolist() == [18, 18]
    # Rewind only sequence 0; sequence 1 keeps its branch.
    cache = cache.rewind(jnp.asarray([12, 18]))
    logits, cache = _extend(name, right, cache)
    expected0 = _full(name, jnp.concatenate([prefix, right], axis=1))[0, 12:]
    expected1 = _full(name, jnp.concatenate([prefix, wrong, right], axis=1))[1, 18:]
    np.testing.assert_allclose(np.asarray(logits[0]), expected0, atol=TOL)
    np.testing.assert_allclose(np.asarray(logits[1]), expected1, atol=TOL)
    assert np.asarray(cache.lengths).tolist() == [17, 23]


def test_ragged_batch_equals_each_sequence_alone():
    name = "qwen2_tied"
    lengths = [5, 11, 8]
    prompts = [_tokens(10 + i, 1, n)[0] for i, n in enumerate(lengths)]
    padded = jnp.stack([jnp.pad(p, (0, 11 - len(p))) for p in prompts])
    cache = _model(name).init_cache(3, MAX_LEN, "float32")
    last, cache = _extend(name, padded, cache, jnp.asarray(lengths, jnp.int32), logits="last")
    assert np.asarray(cache.lengths).tolist() == lengths
    continuation = _tokens(20, 3, 4)
    steps = []
    for t in range(4):
        step, cache = _extend(name, continuation[:, t:t + 1], cache)
        steps.append(step[:, 0])
    for b, prompt in enumerate(prompts):
        alone = _full(name, jnp.concatenate([prompt, continuation[b]])[None])[0]
        np.testing.assert_allclose(np.asarray(last[b]), alone[lengths[b] - 1], atol=TOL)
        for t in range(4):
            np.testing.assert_allclose(np.asarray(steps[t][b]), alone[lengths[b] + t], atol=TOL)


def test_per_sequence_start_positions():
    # Sequences whose cached context differs in length are extended together, each at its own position.
    name = "llama_tied"
    a, b = _tokens(30, 1, 9), _tokens(31, 1, 4)
    cache = _model(name).init_cache(2, MAX_LEN, "float32")
    padded = jnp.concatenate([a, jnp.pad(b, ((0, 0), (0, 5)))])
    _, cache = _extend(name, padded, cache, jnp.asarray([9, 4], jnp.int32))
    chunk = _tokens(32, 2, 3)
    logits, _ = _extend(name, chunk, cache)
    np.testing.assert_allclose(np.asarray(logits[0]), _full(name, jnp.concatenate([a, chunk[:1]], 1))[0, 9:],
                               atol=TOL)
    np.testing.assert_allclose(np.asarray(logits[1]), _full(name, jnp.concatenate([b, chunk[1:]], 1))[0, 4:],
                               atol=TOL)


def test_writes_past_capacity_are_dropped_not_wrapped():
    name = "llama_tied"
    cache = _model(name).init_cache(1, 8, "float32")
    _, cache = _extend(name, _tokens(40, 1, 6), cache)
    keys_before = np.asarray(cache.keys).copy()
    _, cache = _extend(name, _tokens(41, 1, 4), cache)  # slots 6, 7 written; 8, 9 do not exist
    keys_after = np.asarray(cache.keys)
    np.testing.assert_array_equal(keys_after[:, :, :6], keys_before[:, :, :6])
    assert not np.allclose(keys_after[:, :, 6:8], keys_before[:, :, 6:8])


def test_packed_segments_never_attend_across_documents():
    name = "qwen3_untied"
    model = _model(name)
    doc_a, doc_b, doc_b2 = _tokens(50, 1, 7)[0], _tokens(51, 1, 9)[0], _tokens(52, 1, 9)[0]
    packed = jnp.concatenate([doc_a, doc_b])[None]
    packed2 = jnp.concatenate([doc_a, doc_b2])[None]
    segments = jnp.asarray([[1] * 7 + [2] * 9])
    positions = jnp.asarray([list(range(7)) + list(range(9))])
    out = np.asarray(model(packed, positions, segments))
    out2 = np.asarray(model(packed2, positions, segments))
    # Each packed document equals that document run alone (positions restart per segment).
    np.testing.assert_allclose(out[0, :7], _full(name, doc_a[None])[0], atol=TOL)
    np.testing.assert_allclose(out[0, 7:], _full(name, doc_b[None])[0], atol=TOL)
    # Perturbing document B leaves document A untouched, bit for bit.
    np.testing.assert_array_equal(out[0, :7], out2[0, :7])
    assert np.abs(out[0, 7:] - out2[0, 7:]).max() > 1e-3
