"""The paged KV cache: every paged attention path equals the dense cache (the reference) and a float64
formula, over ragged batches, rewinds, freed and reused pages; the pool, not batch x capacity, is what
is allocated; writes without a page are counted, never dropped into another sequence's page."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import motab_jax
from fixtures.make_golden import GOLDEN_DIR, TOKENIZER_SIZE
from motab_jax.models.paged_attention import (gpu_paged_attention, reference_paged_attention, resolve_paged_impl,
                                              tpu_kernel_inputs)
from motab_jax.models.paged_cache import PageAllocator, PagedKVCache, PagePoolExhausted

TOL = 1e-5
PAGE = 4
CAPACITY = 64
# Paths that run on CPU. "reference_combined" is the reference over the TPU kernel's layout.
IMPLS = ["reference", "reference_combined", "pallas_gpu"]


@functools.lru_cache(maxsize=None)
def _model(name: str):
    model, _ = motab_jax.load(GOLDEN_DIR / name, dtype="float32")
    return model


@functools.lru_cache(maxsize=None)
def _jitted_extend(name: str, logits: str, fresh: bool = False):
    graphdef, state = nnx.split(_model(name))

    @functools.partial(jax.jit, donate_argnums=2)
    def run(state, tokens, cache, num_valid):
        return nnx.merge(graphdef, state).extend(tokens, cache, num_valid, logits=logits, fresh=fresh)

    return functools.partial(run, state)


def _tokens(seed: int, batch: int, length: int) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, TOKENIZER_SIZE, (batch, length)), jnp.int32)


def _paged_cache(name: str, impl: str, batch: int, num_pages: int | None = None) -> PagedKVCache:
    tpu_layout = impl == "reference_combined"
    cache = _model(name).init_paged_cache(batch, CAPACITY, page_size=PAGE, num_pages=num_pages, dtype="float32",
                                          impl="pallas_tpu" if tpu_layout else impl)
    return dataclasses.replace(cache, impl="reference") if tpu_layout else cache


class Pair:
    """A dense and a paged cache driven through the same operations; every step compares their logits."""

    def __init__(self, name: str, impl: str, batch: int, num_pages: int | None = None):
        self.name = name
        self.dense = _model(name).init_cache(batch, CAPACITY, "float32")
        self.paged = _paged_cache(name, impl, batch, num_pages)
        self.pages = PageAllocator.for_cache(self.paged)
        self.lengths = np.zeros(batch, int)

    def extend(self, tokens, num_valid=None, logits="all", fresh=False):
        num_valid = np.full(tokens.shape[0], tokens.shape[1]) if num_valid is None else np.asarray(num_valid)
        for seq, n in enumerate(num_valid):
            self.pages.ensure(seq, int(self.lengths[seq] + n))
        self.paged = self.pages.commit(self.paged)
        nv = jnp.asarray(num_valid, jnp.int32)
        want, self.dense = _jitted_extend(self.name, logits)(tokens, self.dense, nv)
        got, self.paged = _jitted_extend(self.name, logits, fresh)(tokens, self.paged, nv)
        self.lengths += num_valid
        assert np.asarray(self.paged.lengths).tolist() == self.lengths.tolist()
        assert np.asarray(self.paged.dropped).tolist() == [0] * len(self.lengths)
        got, want = np.asarray(got), np.asarray(want)
        if logits == "all":  # padding positions (t >= num_valid) are not defined outputs
            for b, n in enumerate(num_valid):
                np.testing.assert_allclose(got[b, :n], want[b, :n], atol=TOL)
                np.testing.assert_array_equal(got[b, :n].argmax(-1), want[b, :n].argmax(-1))
        else:
            np.testing.assert_allclose(got, want, atol=TOL)
        return got

    def rewind(self, lengths):
        lengths = np.asarray(lengths)
        self.dense = self.dense.rewind(jnp.asarray(lengths))
        self.paged = self.paged.rewind(jnp.asarray(lengths))
        for seq, n in enumerate(lengths):
            self.pages.trim(seq, int(n))
        self.lengths = np.minimum(self.lengths, lengths)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["qwen3_untied", "llama3_untied"])
def test_paged_equals_dense_prefill_decode_chunks_rewinds(name, impl):
    pair = Pair(name, impl, batch=3)
    # Ragged prefill: lengths at a page multiple, one past it, and short of one page.
    prompt = _tokens(0, 3, 9)
    pair.extend(prompt, [8, 9, 3], logits="last")
    for t in range(5):  # decode, crossing page boundaries at different steps per sequence
        pair.extend(_tokens(10 + t, 3, 1))
    pair.extend(_tokens(20, 3, 5))  # a k=5 verification chunk
    pair.rewind([14, 11, 9])  # inside a page, across a boundary, and back to a page multiple (2 pages freed)
    pair.extend(_tokens(21, 3, 5), [5, 2, 4])  # a ragged chunk after the rewind
    pair.extend(_tokens(22, 3, 1), [1, 0, 1])  # one sequence idle: nothing written, no page needed
    assert pair.lengths.tolist() == [20, 13, 14]


@pytest.mark.parametrize("impl", ["reference", "pallas_gpu"])
def test_freed_pages_are_reused_without_leaking_old_keys(impl):
    name = "qwen2_tied"
    # A pool with room for about two sequences at a time: pages cycle through different owners.
    pair = Pair(name, impl, batch=2, num_pages=1 + 2 * 4)
    pair.extend(_tokens(30, 2, 12))
    pair.pages.free(0)
    pair.dense = pair.dense.with_lengths(jnp.asarray([0, 12]))
    pair.paged = pair.paged.with_lengths(jnp.asarray([0, 12]))
    pair.lengths = np.asarray([0, 12])
    pair.extend(_tokens(31, 2, 3), [3, 1])  # sequence 0 restarts on recycled pages
    pair.extend(_tokens(32, 2, 4))
    assert pair.pages.free_pages == 8 - 2 - 5


def test_fresh_prefill_equals_cached_prefill():
    name = "llama_tied"
    pair = Pair(name, "reference", batch=3)
    tokens = _tokens(40, 3, 10)
    pair.extend(tokens, [10, 4, 7], logits="all", fresh=True)  # no cache read; keys/values written
    pair.extend(_tokens(41, 3, 3))  # the written keys/values serve the next chunk
    # The dense cache's fresh prefill writes the same keys as its cached prefill.
    nv = jnp.asarray([10, 4, 7], jnp.int32)
    cached_logits, cached = _jitted_extend(name, "last")(tokens, _model(name).init_cache(3, CAPACITY, "float32"), nv)
    fresh_logits, fresh = _jitted_extend(name, "last", True)(tokens, _model(name).init_cache(3, CAPACITY, "float32"),
                                                             nv)
    np.testing.assert_allclose(np.asarray(fresh_logits), np.asarray(cached_logits), atol=TOL)
    np.testing.assert_allclose(np.asarray(fresh.keys), np.asarray(cached.keys), atol=TOL)


def test_greedy_tokens_identical():
    name = "qwen3_untied"
    pair = Pair(name, "reference", batch=2)
    logits = pair.extend(_tokens(50, 2, 6), logits="last")
    for _ in range(12):
        nxt = jnp.asarray(logits.argmax(-1)[:, None], jnp.int32)
        logits = pair.extend(nxt, logits="last")  # asserts the dense and paged argmax agree at every step


def test_writes_without_a_page_are_counted_not_misplaced():
    name = "llama_tied"
    cache = _paged_cache(name, "reference", batch=2)
    pages = PageAllocator.for_cache(cache)
    pages.ensure(0, 4)  # one page for sequence 0, none for sequence 1
    pages.ensure(1, 4)
    cache = pages.commit(cache)
    before = np.asarray(cache.k_pages).copy()
    _, cache = _jitted_extend(name, "none")(_tokens(60, 2, 6), cache, jnp.asarray([6, 2], jnp.int32))
    assert np.asarray(cache.dropped).tolist() == [2, 0]  # positions 4, 5 of sequence 0 had no page
    after = np.asarray(cache.k_pages)
    touched = np.nonzero(np.abs(after - before).reshape(after.shape[0], after.shape[1], -1).max(axis=(0, 2)))[0]
    layers, per_layer = cache.num_layers, cache.num_pages
    owned = {l * per_layer + p for l in range(layers) for p in pages.table[:, 0]}
    assert set(touched.tolist()) <= owned  # only the two sequences' own pages changed
    assert not np.any(after[:, [l * per_layer for l in range(layers)]])  # null pages stay zero


def test_allocator_ensure_trim_free_and_exhaustion():
    pages = PageAllocator(num_pages=6, page_size=4, batch=2, pages_per_seq=4)
    assert pages.free_pages == 5
    pages.ensure(0, 9)  # 3 pages
    assert pages.held.tolist() == [3, 0] and pages.free_pages == 2
    assert 0 not in pages.table[0, :3].tolist()
    pages.ensure(0, 12)  # still 3 pages
    assert pages.free_pages == 2
    with pytest.raises(PagePoolExhausted, match="needs 3 more pages"):
        pages.ensure(1, 10)
    with pytest.raises(ValueError, match="pages_per_seq=4"):
        pages.ensure(0, 17)
    pages.trim(0, 5)  # positions 0..4 live: pages 0 and 1 kept
    assert pages.held.tolist() == [2, 0] and pages.free_pages == 3 and pages.table[0, 2] == 0
    pages.trim(0, 8)  # a trim never grows
    assert pages.held.tolist() == [2, 0]
    pages.ensure(1, 10)
    pages.free(0)
    assert pages.free_pages == 2 and pages.table[0].tolist() == [0, 0, 0, 0]
    assert sorted(pages.table[1, :3].tolist() + [0]) != [0, 0, 0, 0]


def test_pool_not_batch_times_capacity_decides_memory():
    model = _model("qwen3_untied")
    cfg = model.config
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    cache = model.init_paged_cache(64, 32768, page_size=16, num_pages=257, dtype="float32")
    assert cache.max_length == 32768 and cache.pages_per_seq == 2048
    assert cache.nbytes == 257 * 16 * per_token  # 8.0 MiB, against 64 x 32768 x per_token = 2 GiB dense
    live = sum(a.nbytes for a in jax.tree.leaves(cache))
    assert live < cache.nbytes + 64 * 2048 * 4 + 1024  # pool + page table + lengths
    budget = model.init_paged_cache(64, 32768, page_size=16, budget_bytes=4 * 2**20, dtype="float32")
    assert budget.nbytes <= 4 * 2**20 and budget.num_pages == 4 * 2**20 // (16 * per_token)


# ------------------------------------------------------------------ kernels against float64
def _random_cache(layout_impl: str, seed: int, lengths: list[int], page: int = 4, pps: int = 12, hkv: int = 2,
                  d: int = 16, layers: int = 2):
    rng = np.random.default_rng(seed)
    batch = len(lengths)
    cache = PagedKVCache.zeros(num_layers=layers, num_kv_heads=hkv, head_dim=d, num_pages=1 + batch * pps,
                               page_size=page, batch=batch, pages_per_seq=pps, dtype=jnp.float32, impl=layout_impl)
    pages = PageAllocator.for_cache(cache)
    for seq in rng.permutation(batch):  # interleaved owners: page ids are not contiguous per sequence
        pages.ensure(int(seq), lengths[seq])
    cache = pages.commit(cache)
    width = max(lengths)
    k = rng.normal(size=(layers, batch, width, hkv, d)).astype(np.float32)
    v = rng.normal(size=(layers, batch, width, hkv, d)).astype(np.float32)
    positions = jnp.broadcast_to(jnp.arange(width), (batch, width))
    valid = positions < jnp.asarray(lengths)[:, None]
    for layer in range(layers):
        cache = cache.write(jnp.int32(layer), cache.page_slots(positions, valid), jnp.asarray(k[layer]),
                            jnp.asarray(v[layer]))
    return cache, k, v


def _float64_attention(q, k, v, starts, num_valid):
    """q [B, T, H, D], k/v [B, S, Hkv, D]: query t of row b at starts+t sees keys j <= starts + t."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros((b, t, h, d))
    for r in range(b):
        for i in range(num_valid[r]):
            n = starts[r] + i + 1
            kk, vv = np.repeat(k[r, :n], group, axis=1), np.repeat(v[r, :n], group, axis=1)
            s = np.einsum("hd,shd->hs", q[r, i], kk) / np.sqrt(d)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[r, i] = np.einsum("hs,shd->hd", p / p.sum(-1, keepdims=True), vv)
    return out


@pytest.mark.parametrize("block_tokens", [4, 8, 256])
def test_reference_kernel_matches_float64(block_tokens):
    starts, num_valid = np.asarray([0, 7, 12, 30]), np.asarray([3, 1, 4, 2])
    cache, k, v = _random_cache("reference", 1, (starts + num_valid).tolist())
    q = jnp.asarray(np.random.default_rng(2).normal(size=(4, 4, 4, 16)), jnp.float32)
    positions = jnp.asarray(starts)[:, None] + jnp.arange(4)[None]
    for layer in range(2):
        got = reference_paged_attention(q, cache, jnp.int32(layer), positions, jnp.asarray(starts + num_valid),
                                        block_tokens=block_tokens)
        want = _float64_attention(q, k[layer], v[layer], starts, num_valid)
        for r in range(4):
            np.testing.assert_allclose(np.asarray(got)[r, :num_valid[r]], want[r, :num_valid[r]], atol=TOL)


def test_gpu_kernel_in_interpret_mode_matches_float64():
    starts, num_valid = np.asarray([0, 5, 16, 33]), np.asarray([2, 3, 1, 4])
    cache, k, v = _random_cache("pallas_gpu", 3, (starts + num_valid).tolist())
    q = jnp.asarray(np.random.default_rng(4).normal(size=(4, 4, 4, 16)), jnp.float32)
    for layer in range(2):
        t = np.arange(4)
        k_new = jnp.asarray(k[layer][np.arange(4)[:, None], np.minimum(starts[:, None] + t, k.shape[2] - 1)])
        v_new = jnp.asarray(v[layer][np.arange(4)[:, None], np.minimum(starts[:, None] + t, v.shape[2] - 1)])
        got = gpu_paged_attention(q, k_new, v_new, cache, jnp.int32(layer), jnp.asarray(starts, jnp.int32),
                                  jnp.asarray(num_valid, jnp.int32), interpret=True)
        want = _float64_attention(q, k[layer], v[layer], starts, num_valid)
        for r in range(4):
            np.testing.assert_allclose(np.asarray(got)[r, :num_valid[r]], want[r, :num_valid[r]], atol=TOL)


def test_tpu_kernel_inputs_through_the_packages_reference():
    """Our packing, layout and page ids fed to the package's own ragged-paged-attention reference."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention.kernel import dynamic_validate_inputs

    starts, num_valid = np.asarray([0, 6, 13, 0]), np.asarray([3, 1, 4, 0])
    cache, k, v = _random_cache("pallas_tpu", 5, np.maximum(starts + num_valid, 1).tolist())
    q = jnp.asarray(np.random.default_rng(6).normal(size=(4, 4, 4, 16)), jnp.float32)
    for layer in range(2):
        args, kwargs, unpack = tpu_kernel_inputs(q, cache, jnp.int32(layer), jnp.asarray(starts, jnp.int32),
                                                 jnp.asarray(num_valid, jnp.int32))
        dynamic_validate_inputs(*args, **kwargs)  # the kernel's own checks: shapes, dtypes, q_len <= kv_len
        got = unpack(ref_ragged_paged_attention(*args, **kwargs))
        want = _float64_attention(q, k[layer], v[layer], starts, num_valid)
        for r in range(4):
            np.testing.assert_allclose(np.asarray(got)[r, :num_valid[r]], want[r, :num_valid[r]], atol=TOL)


def test_auto_picks_per_backend_and_unknown_is_rejected():
    assert resolve_paged_impl("auto") == "reference"  # the tests run on CPU
    assert resolve_paged_impl("pallas_gpu") == "pallas_gpu"
    with pytest.raises(ValueError, match="accepted"):
        resolve_paged_impl("flash")


def test_paged_cache_on_a_mesh_equals_unplaced():
    name = "qwen3_untied"
    mesh = motab_jax.make_mesh(motab_jax.MeshConfig(data=4, fsdp=1, tensor=2))
    model, _ = motab_jax.load(GOLDEN_DIR / name, dtype="float32", mesh=mesh)
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, t, c, n: nnx.merge(graphdef, s).extend(t, c, n, logits="all"))
    tokens = _tokens(70, 2, 7)
    nv = jnp.asarray([7, 5], jnp.int32)
    results = []
    for place in (False, True):
        cache = model.init_paged_cache(2, CAPACITY, page_size=PAGE, dtype="float32")
        pages = PageAllocator.for_cache(cache)
        pages.ensure(0, 7)
        pages.ensure(1, 5)
        cache = pages.commit(cache)
        cache = cache.placed(mesh) if place else cache
        logits, out = run(state, tokens, cache, nv)
        _, out = run(state, _tokens(71, 2, 1), out, jnp.asarray([1, 1], jnp.int32))  # the placement survives a step
        results.append(np.asarray(logits))
        if place:
            assert out.k_pages.sharding.spec[0] == "tensor"  # KV heads split over the tensor axis
    np.testing.assert_allclose(results[1], results[0], atol=TOL)
