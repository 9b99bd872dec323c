"""The mixture-of-experts layer: grouped experts (ragged_dot over the routed assignments) against the dense
all-experts reference, and on an accelerator a gpt-oss-20b-shaped decode.

    python experiments/bench_moe.py                       # CPU: one MoE layer, tiny and gpt-oss-shaped widths
    python experiments/bench_moe.py --decode --batch 64   # accelerator: gpt-oss-20b-shaped random weights, decode

1. One MoE layer (`models.moe`) at gpt-oss's routing (top-4), several expert counts and token counts: wall time
   per call of `grouped_experts` and `dense_experts` (jitted, compilation excluded; median of --repeats), and
   their ratio. The grouped path does k expert MLPs per token; the dense one E.
2. `--decode`: a gpt-oss-20b-shaped model with random weights (24 layers, 32 experts, bf16) on one device, decode
   tokens/s at --batch slots with --context tokens cached each, and the fraction of the bandwidth floor: per
   step the active parameter bytes (the experts the batch routes to, at most all of them, plus attention,
   router and head) and the live KV bytes, over the device's memory bandwidth (--bandwidth GB/s; H100 SXM 3350,
   H200 4800).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from motab_jax.models.config import ModelConfig  # noqa: E402
from motab_jax.models.moe import dense_experts, grouped_experts, route  # noqa: E402


def layer_config(experts: int, hidden: int, inter: int) -> ModelConfig:
    return ModelConfig(model_type="gpt_oss", vocab_size=256, hidden_size=hidden, intermediate_size=inter,
                       num_layers=1, num_heads=1, num_kv_heads=1, head_dim=hidden, num_experts=experts,
                       experts_per_token=4)


def median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def layer_table(repeats: int) -> None:
    print("| experts | hidden / expert width | tokens | grouped (ms) | dense (ms) | dense / grouped |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for experts, hidden, inter in ((8, 64, 64), (32, 256, 256), (128, 256, 256)):
        cfg = layer_config(experts, hidden, inter)
        keys = jax.random.split(jax.random.key(0), 6)
        p = {"router": jax.random.normal(keys[0], (hidden, experts)) * 0.1,
             "router_bias": jnp.zeros((experts,)),
             "expert_gate_up": jax.random.normal(keys[1], (experts, hidden, 2 * inter)) * 0.02,
             "expert_gate_up_bias": jnp.zeros((experts, 2 * inter)),
             "expert_down": jax.random.normal(keys[2], (experts, inter, hidden)) * 0.02,
             "expert_down_bias": jnp.zeros((experts, hidden))}
        grouped = jax.jit(lambda p, h, w, e: grouped_experts(cfg, p, h, w, e))
        dense = jax.jit(lambda p, h, w, e: dense_experts(cfg, p, h, w, e))
        for tokens in (64, 512):
            h = jax.random.normal(keys[3], (tokens, hidden))
            weights, chosen = route(cfg, h, p["router"], p["router_bias"])
            t_grouped = median_seconds(grouped, p, h, weights, chosen, repeats=repeats)
            t_dense = median_seconds(dense, p, h, weights, chosen, repeats=repeats)
            print(f"| {experts} | {hidden} / {inter} | {tokens} | {1e3 * t_grouped:.2f} | {1e3 * t_dense:.2f} | "
                  f"{t_dense / t_grouped:.1f}x |")


def decode_table(batch: int, context: int, steps: int, bandwidth_gbs: float) -> None:
    from flax import nnx

    from motab_jax.models.loading import init_random
    from motab_jax.models.paged_cache import PageAllocator

    layers = 24
    cfg = ModelConfig(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                      num_layers=layers, num_heads=64, num_kv_heads=8, head_dim=64, num_experts=32,
                      experts_per_token=4, qkv_bias=True, o_bias=True, attention_sinks=True, norm_weight_float32=True,
                      layer_windows=tuple(128 if i % 2 == 0 else 0 for i in range(layers)), param_dtype="bfloat16",
                      compute_dtype="bfloat16")
    model = init_random(cfg, seed=0)
    cache = model.init_paged_cache(batch, context + steps + 1, page_size=16)
    allocator = PageAllocator.for_cache(cache)
    for row in range(batch):
        allocator.ensure(row, context + steps + 1)
    cache = allocator.commit(cache)
    graph, state = nnx.split(model)
    extend = jax.jit(lambda s, t, c: nnx.merge(graph, s).extend(t, c, logits="last"), donate_argnums=2)
    prompt = jax.random.randint(jax.random.key(1), (batch, context), 0, 1000)
    _, cache = extend(state, prompt, cache)
    token = jnp.zeros((batch, 1), jnp.int32)
    logits, cache = extend(state, token, cache)  # compile the decode step
    jax.block_until_ready(logits)
    start = time.perf_counter()
    for _ in range(steps):
        logits, cache = extend(state, token, cache)
    jax.block_until_ready(logits)
    seconds = (time.perf_counter() - start) / steps
    expert_bytes = 2 * (3 * cfg.hidden_size * cfg.intermediate_size)
    experts_read = min(cfg.num_experts, batch * cfg.experts_per_token)  # at most every expert once per layer
    weights = 2 * (cfg.num_active_params - layers * cfg.experts_per_token * expert_bytes // 2) \
        + layers * experts_read * expert_bytes
    kv = batch * (context + steps // 2) * layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    floor = (weights + kv) / (bandwidth_gbs * 1e9)
    print(f"device {jax.devices()[0].device_kind}: batch {batch}, context {context}: {1e3 * seconds:.2f} ms per step, "
          f"{batch / seconds:.0f} tokens/s; floor {1e3 * floor:.2f} ms (weights {weights / 1e9:.1f} GB + KV "
          f"{kv / 1e9:.2f} GB at {bandwidth_gbs:g} GB/s): {floor / seconds:.0%} of the bandwidth floor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode", action="store_true", help="the gpt-oss-20b-shaped decode (an accelerator)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--bandwidth", type=float, default=3350.0, help="device memory bandwidth, GB/s")
    args = parser.parse_args()
    if args.decode:
        decode_table(args.batch, args.context, args.steps, args.bandwidth)
    else:
        layer_table(args.repeats)


if __name__ == "__main__":
    main()
