"""The mixture-of-experts MLP (gpt-oss): top-k routing, a grouped matmul, expert parallelism.

- Routing: router logits = h W + b over the experts; the k largest raw logits pick the experts and a softmax
  over those k logits weighs them (no renormalisation over all experts, no shared expert).
- Experts: gate_up = h W_gu[e] + b_gu[e] with the gate and up columns interleaved (gate = even columns);
  gate = min(gate, limit), up = clip(up, -limit, limit), out = ((up + 1) * gate * sigmoid(alpha * gate))
  W_down[e] + b_down[e].
- `grouped_experts` (the engine's and training's path): the token-expert assignments sorted by expert and
  one `jax.lax.ragged_dot` per projection, so each assignment costs one expert's FLOPs whatever the expert
  count. `dense_experts` computes every expert for every token: the reference the tests compare against.
  "auto" picks grouped on GPU and TPU and dense on CPU, where XLA lowers ragged_dot to a loop of masked dense
  products and the dense path measured 2.5-5x faster (`experiments/bench_moe.py`).
- Expert parallelism: when the experts axis of the weights is split over mesh axes (the logical-axis rules
  decide; `expert_mesh_axes`), the layer runs under `shard_map` manual over those axes: every device holds
  E / n experts and sees all tokens (replicated: the engine's forwards carry few tokens, decode steps and
  k+1 chunks), computes its own experts' share of each token, and one `psum` of the [tokens, embed] result
  combines the shares, the same traffic as a tensor-parallel MLP's all-reduce. XLA's automatic partitioner
  would instead all-gather the expert weights for a ragged_dot. The split is recorded in the config
  (`ModelConfig.expert_axes`, set where the weights are placed) because a traced array does not carry it.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from motab_jax.models.config import ModelConfig

MoEImpl = Literal["auto", "grouped", "dense"]
_EXPERT_PARAMS = ("expert_gate_up", "expert_gate_up_bias", "expert_down", "expert_down_bias")


def route(cfg: ModelConfig, h: jax.Array, router: jax.Array, router_bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """h [N, D] -> (weights [N, k] in h's dtype, expert ids [N, k] int32)."""
    logits = jnp.einsum("nd,de->ne", h, router) + router_bias
    top_logits, experts = jax.lax.top_k(logits, cfg.experts_per_token)
    return jax.nn.softmax(top_logits, axis=-1).astype(h.dtype), experts.astype(jnp.int32)


def _swiglu(cfg: ModelConfig, gate_up: jax.Array) -> jax.Array:
    """Interleaved gate/up [..., 2F] -> the clamped SwiGLU [..., F]."""
    pairs = gate_up.reshape(*gate_up.shape[:-1], -1, 2)
    gate = jnp.minimum(pairs[..., 0], cfg.swiglu_limit)
    up = jnp.clip(pairs[..., 1], -cfg.swiglu_limit, cfg.swiglu_limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * cfg.swiglu_alpha))


def dense_experts(cfg: ModelConfig, p: dict[str, jax.Array], h: jax.Array, weights: jax.Array,
                  experts: jax.Array, first_expert: jax.Array | int = 0) -> jax.Array:
    """Every expert held in `p` (global ids from `first_expert`) on every token, combined with the routing weights
    [N, D]: the reference, and the faster path where XLA has no grouped matmul (CPU)."""
    local = p["expert_down"].shape[0]
    gate_up = jnp.einsum("nd,edf->nef", h, p["expert_gate_up"]) + p["expert_gate_up_bias"]
    out = jnp.einsum("nef,efd->ned", _swiglu(cfg, gate_up), p["expert_down"]) + p["expert_down_bias"]
    ids = experts - first_expert
    ids = jnp.where((ids >= 0) & (ids < local), ids, local)  # another device's expert: out of bounds, dropped
    combine = jnp.zeros((h.shape[0], local), h.dtype).at[jnp.arange(h.shape[0])[:, None], ids].add(weights, mode="drop")
    return jnp.einsum("ne,ned->nd", combine, out)


def grouped_experts(cfg: ModelConfig, p: dict[str, jax.Array], h: jax.Array, weights: jax.Array,
                    experts: jax.Array, first_expert: jax.Array | int = 0) -> jax.Array:
    """The experts held in `p` (`p["expert_down"].shape[0]` of them, global ids from `first_expert`) applied to
    the assignments routed to them, weighted and summed per token: [N, D] (zero for tokens routed elsewhere)."""
    n, k = experts.shape
    local = p["expert_down"].shape[0]
    flat = experts.reshape(-1) - first_expert  # local ids; out of [0, local) = another device's expert
    mine = (flat >= 0) & (flat < local)
    # Sort the assignments by local expert, other devices' last: ragged_dot takes contiguous groups, and rows
    # past the groups' total come out zero.
    order = jnp.argsort(jnp.where(mine, flat, local), stable=True)
    ids = jnp.where(mine, flat, 0)[order]
    rows = h[order // k]
    group_sizes = jnp.zeros((local,), jnp.int32).at[jnp.where(mine, flat, local)].add(1, mode="drop")
    gate_up = jax.lax.ragged_dot(rows, p["expert_gate_up"], group_sizes) + p["expert_gate_up_bias"][ids]
    out = jax.lax.ragged_dot(_swiglu(cfg, gate_up).astype(h.dtype), p["expert_down"], group_sizes)
    out = out + p["expert_down_bias"][ids]
    scale = jnp.where(mine, weights.reshape(-1), 0)[order].astype(out.dtype)
    return jnp.zeros((n, h.shape[-1]), out.dtype).at[order // k].add(out * scale[:, None])


def resolve_moe_impl(impl: str) -> str:
    if impl not in ("auto", "grouped", "dense"):
        raise ValueError(f"moe_impl={impl!r}; accepted: 'auto', 'grouped', 'dense'")
    if impl == "auto":
        return "dense" if jax.default_backend() == "cpu" else "grouped"
    return impl


def moe_mlp(cfg: ModelConfig, p: dict[str, jax.Array], h: jax.Array, impl: MoEImpl = "auto",
            mesh: jax.sharding.AbstractMesh | jax.sharding.Mesh | None = None) -> jax.Array:
    """h [B, T, D] -> the MoE MLP's output [B, T, D]. With `mesh`, the experts are split over its axes
    `cfg.expert_axes` (what the placement rules gave the weights)."""
    b, t, d = h.shape
    flat = h.reshape(b * t, d)
    weights, experts = route(cfg, flat, p["router"], p["router_bias"])
    apply = dense_experts if resolve_moe_impl(impl) == "dense" else grouped_experts
    expert_params = {name: p[name] for name in _EXPERT_PARAMS}
    axes = tuple(cfg.expert_axes)
    if not axes or mesh is None:
        return apply(cfg, expert_params, flat, weights, experts).reshape(b, t, d).astype(h.dtype)

    def local(params, flat, weights, experts):
        index = jnp.int32(0)
        for axis in axes:  # row-major over the axes, as the experts dimension is split
            index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
        out = apply(cfg, params, flat, weights, experts, index * params["expert_down"].shape[0])
        return jax.lax.psum(out, axes)

    spec = PartitionSpec(axes)
    out = jax.shard_map(local, mesh=mesh, in_specs=({name: spec for name in expert_params}, PartitionSpec(),
                                                    PartitionSpec(), PartitionSpec()),
                        out_specs=PartitionSpec(), axis_names=set(axes), check_vma=False)(
        expert_params, flat, weights, experts)
    return out.reshape(b, t, d).astype(h.dtype)
