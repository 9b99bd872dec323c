"""Paged vs dense KV cache: does decode cost follow the live tokens or the capacity?

    python experiments/bench_paged.py                  # CPU: capacity sweep at a fixed live length (~2 min)
    python experiments/bench_paged.py --preset gpu     # GPU or TPU: kernel checks + the accelerator table
    python experiments/bench_paged.py --preset gpu --smoke   # the gpu code paths at toy sizes (any backend)

CPU: decode time per token at live length L with the cache capacity at L, 4K and 32K, for the dense cache
(attention over the whole buffer) and the paged cache (pool sized for the full capacity, so both reserve
the same memory); the figure of merit is the ratio capacity-32K / capacity-L of each. Also the bytes the
paged cache allocates for 64 slots x 32K capacity at a given pool size, against the dense cache's.

GPU: decode tokens/s of a 1.5B-shaped student at batch 64 (dense vs paged, live 1K and 8K) with the
fraction of the HBM-bandwidth floor (weights + live KV read once per step over measured copy bandwidth),
the k+1 = 9 verification forward of a 7B-shaped teacher, and a packed 32K-token SFT step of the
1.5B shape (time, peak memory, MFU against the card's dense bf16 peak given by --peak_tflops).
Random weights throughout; timings exclude compilation; every ratio comes from one run on one machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from report import copy_bandwidth, print_table  # noqa: E402

from motab_jax.models import ModelConfig, init_random  # noqa: E402
from motab_jax.models.paged_cache import PageAllocator, kv_bytes_per_token  # noqa: E402

SHAPES = {
    "cpu": dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128),
    "toy": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
}


def make_model(shape: str, vocab: int, dtype: str, **overrides):
    cfg = ModelConfig(model_type="qwen2", vocab_size=vocab, qkv_bias=True, param_dtype=dtype, compute_dtype=dtype,
                      max_position_embeddings=1 << 17, **SHAPES[shape], **overrides)
    return init_random(cfg, seed=0)


def extend_fn(model, logits: str = "last"):
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=2)
    def run(state, tokens, cache, num_valid):
        return nnx.merge(graphdef, state).extend(tokens, cache, num_valid, logits=logits)

    return functools.partial(run, state)


def filled_cache(model, kind: str, batch: int, capacity: int, live: int, page_size: int, dtype: str,
                 chunk: int = 1):
    """A cache of `capacity` positions per sequence holding `live` tokens (+ pages for the next chunk)."""
    if kind == "dense":
        cache = model.init_cache(batch, capacity, dtype)
    else:
        cache = model.init_paged_cache(batch, capacity, page_size=page_size, dtype=dtype,
                                       num_pages=batch * (-(-capacity // page_size)) + 1)
        pages = PageAllocator.for_cache(cache)
        for seq in range(batch):
            pages.ensure(seq, min(live + chunk, capacity))
        cache = pages.commit(cache)
    step = extend_fn(model, "none")
    fill = 512
    for start in range(0, live, fill):
        n = min(fill, live - start)
        tokens = jnp.zeros((batch, n), jnp.int32)
        _, cache = step(tokens, cache, jnp.full((batch,), n, jnp.int32))
    return cache


def time_chunk(model, cache, live: int, chunk: int, steps: int, rounds: int = 5) -> float:
    """Seconds per forward of `chunk` tokens per sequence at live length `live` (rewound each time);
    the best of `rounds` rounds of `steps` forwards, so another process's load does not skew a ratio."""
    step = extend_fn(model, "last")
    batch = cache.lengths.shape[0]
    tokens = jnp.ones((batch, chunk), jnp.int32)
    num_valid = jnp.full((batch,), chunk, jnp.int32)
    back = jnp.full((batch,), live, jnp.int32)
    logits, cache = step(tokens, cache, num_valid)  # compile
    logits.block_until_ready()
    cache = cache.rewind(back)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            logits, cache = step(tokens, cache, num_valid)
            cache = cache.rewind(back)
        logits.block_until_ready()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def cpu_report(args) -> list[tuple[str, str]]:
    model = make_model("cpu", 512, "float32")
    rows = []
    live, batch = args.live, args.batch
    for kind in ("dense", "paged"):
        times = {}
        for capacity in (live + 16, 4096, 32768):
            cache = filled_cache(model, kind, batch, capacity, live, args.page_size, "float32")
            times[capacity] = time_chunk(model, cache, live, 1, args.steps)
            rows.append((f"{kind} decode ms/token, live {live}, capacity {capacity}",
                         f"{1e3 * times[capacity] / batch:.3f}"))
            del cache
        rows.append((f"{kind} ratio capacity 32768 / capacity {live + 16}", f"{times[32768] / times[live + 16]:.2f}x"))
    per_token = kv_bytes_per_token(model.config.num_layers, model.config.num_kv_heads, model.config.head_dim,
                                   "float32")
    pool_pages = 64 * 1024 // args.page_size + 1
    cache = model.init_paged_cache(64, 32768, page_size=args.page_size, num_pages=pool_pages, dtype="float32")
    allocated = sum(a.nbytes for a in jax.tree.leaves(cache))
    rows.append(("64 slots x 32K: dense cache bytes", f"{64 * 32768 * per_token / 2**20:,.0f} MiB"))
    rows.append((f"64 slots x 32K: paged, pool of {pool_pages} pages x {args.page_size}, bytes allocated",
                 f"{allocated / 2**20:,.1f} MiB"))
    return rows


def kernel_check_rows() -> list[tuple[str, str]]:
    """Max |kernel - reference| of the backend's paged kernel over a ragged batch (prefix + k+1 chunk)."""
    import dataclasses

    from motab_jax.models.paged_attention import paged_attention, reference_paged_attention, resolve_paged_impl
    from motab_jax.models.paged_cache import PagedKVCache

    impl = resolve_paged_impl("auto")
    if impl == "reference":
        return [("paged kernel check", "no GPU/TPU kernel on this backend (reference only)")]
    rng = np.random.default_rng(0)
    batch, hkv, group, d, page, pps, t = 6, 2, 6, 128, 16, 64, 9
    starts = np.asarray([0, 1, 15, 16, 300, 1000])
    num_valid = np.asarray([9, 9, 1, 5, 9, 9])
    rows = []
    for dtype, tol in (("float32", 2e-5), ("bfloat16", 4e-2)):
        cache = PagedKVCache.zeros(num_layers=2, num_kv_heads=hkv, head_dim=d, num_pages=1 + batch * pps,
                                   page_size=page, batch=batch, pages_per_seq=pps, dtype=dtype, impl=impl)
        pages = PageAllocator.for_cache(cache)
        for seq in rng.permutation(batch):
            pages.ensure(int(seq), int(starts[seq] + num_valid[seq]))
        cache = pages.commit(cache)
        width = int((starts + num_valid).max())
        positions = jnp.broadcast_to(jnp.arange(width), (batch, width))
        k = jnp.asarray(rng.normal(size=(batch, width, hkv, d)), dtype)
        v = jnp.asarray(rng.normal(size=(batch, width, hkv, d)), dtype)
        valid = positions < jnp.asarray(starts + num_valid)[:, None]
        cache = cache.write(jnp.int32(1), cache.page_slots(positions, valid), k, v)
        q = jnp.asarray(rng.normal(size=(batch, t, hkv * group, d)), dtype)
        take = np.minimum(starts[:, None] + np.arange(t), width - 1)
        k_new, v_new = k[np.arange(batch)[:, None], take], v[np.arange(batch)[:, None], take]
        sv, nv = jnp.asarray(starts, jnp.int32), jnp.asarray(num_valid, jnp.int32)
        got = jax.jit(paged_attention)(q, k_new, v_new, cache, jnp.int32(1), sv, nv)
        ref = dataclasses.replace(cache, impl="reference")
        want = jax.jit(reference_paged_attention)(q, ref, jnp.int32(1), sv[:, None] + jnp.arange(t), sv + nv)
        mask = np.arange(t)[None, :] < num_valid[:, None]
        err = float(np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))[mask].max())
        verdict = "ok" if err < tol else "FAIL"
        rows.append((f"paged kernel {impl} vs reference, {dtype}", f"max |diff| {err:.1e} ({verdict})"))
    return rows


def gpu_report(args) -> list[tuple[str, str]]:
    dtype = "bfloat16"
    smoke = args.smoke
    student = make_model("toy" if smoke else "1.5b", 512 if smoke else 151936, dtype)
    teacher = make_model("toy" if smoke else "7b", 512 if smoke else 152064, dtype)
    batch = 4 if smoke else 64
    lives = (64, 128) if smoke else (1024, 8192)
    steps = 2 if smoke else args.steps
    rows = []
    bandwidth = copy_bandwidth()
    rows.append(("device", jax.devices()[0].device_kind))
    rows.append(("measured copy bandwidth", f"{bandwidth / 1e9:.0f} GB/s"))
    rows += kernel_check_rows()
    cfg = student.config
    weight_bytes = cfg.num_params * 2
    per_token = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
    for live in lives:
        capacity = live + 64
        for kind in ("dense", "paged"):
            cache = filled_cache(student, kind, batch, capacity, live, args.page_size, dtype)
            seconds = time_chunk(student, cache, live, 1, steps)
            floor = (weight_bytes + batch * live * per_token) / bandwidth
            rows.append((f"student decode, {kind}, batch {batch}, live {live}",
                         f"{batch / seconds:,.0f} tok/s, {100 * floor / seconds:.0f}% of bandwidth floor"))
            del cache
    tcfg = teacher.config
    t_weights = tcfg.num_params * 2
    t_token = kv_bytes_per_token(tcfg.num_layers, tcfg.num_kv_heads, tcfg.head_dim, dtype)
    for live in lives:
        for kind in ("dense", "paged"):
            cache = filled_cache(teacher, kind, batch, live + 64, live, args.page_size, dtype, chunk=9)
            seconds = time_chunk(teacher, cache, live, 9, steps)
            floor = (t_weights + batch * live * t_token) / bandwidth
            rows.append((f"teacher k+1=9 verification, {kind}, batch {batch}, live {live}",
                         f"{1e3 * seconds:.1f} ms, {100 * floor / seconds:.0f}% of bandwidth floor"))
            del cache
    rows += sft_step_rows(smoke, args.peak_tflops)
    return rows


def sft_step_rows(smoke: bool, peak_tflops: float) -> list[tuple[str, str]]:
    """One packed SFT step (forward + backward + AdamW) over one 32K-token row of several documents."""
    import optax

    length = 1024 if smoke else 32768
    model = make_model("toy" if smoke else "1.5b", 512 if smoke else 151936, "bfloat16", remat="full")
    graphdef, state = nnx.split(model)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), state)
    tx = optax.adamw(1e-5)
    opt = tx.init(params)
    docs = 8
    segments = jnp.repeat(jnp.arange(1, docs + 1, dtype=jnp.int32), length // docs)[None]
    positions = jnp.tile(jnp.arange(length // docs, dtype=jnp.int32), docs)[None]
    tokens = jnp.ones((1, length), jnp.int32)

    def loss_fn(p):
        m = nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(jnp.bfloat16), p))
        hidden = m.hidden_states(tokens, positions, segments)
        logits = m.logits(hidden[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, o):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    params, opt, loss = step(params, opt)
    loss.block_until_ready()
    start = time.perf_counter()
    params, opt, loss = step(params, opt)
    loss.block_until_ready()
    seconds = time.perf_counter() - start
    cfg = model.config
    flops = 6 * cfg.num_params * length + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * length * length / docs
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", 0)
    return [(f"packed SFT step, {length} tokens in {docs} documents, remat full",
             f"{seconds:.2f} s, peak {peak / 2**30:.1f} GiB, MFU {100 * flops / seconds / (peak_tflops * 1e12):.0f}%")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--smoke", action="store_true", help="gpu preset at toy sizes (checks the code paths)")
    parser.add_argument("--live", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--page_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    args = parser.parse_args()
    rows = cpu_report(args) if args.preset == "cpu" else gpu_report(args)
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    print_table(rows)


if __name__ == "__main__":
    main()
