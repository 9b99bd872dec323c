"""The decoder-only transformer (Llama 3.x, SmolLM2, Qwen2/2.5, Qwen3, gpt-oss) as a Flax NNX module.

Parameters are declared once in `PARAM_TABLE` (name, logical axes, initialiser, presence rule); the
shape of every parameter follows from its logical axes, layer parameters are stacked along a leading
"layers" axis, and the forward pass runs the layers under `lax.scan`. The same table drives random
initialisation, sharding, checkpoint loading and export.

Calling conventions (all return float32 logits):
- `model(tokens, positions=None, segment_ids=None)` -> [B, T, V]: full forward, no cache (training,
  scoring; packed inputs via segment ids and per-segment positions).
- `model.extend(tokens, cache, num_valid=None, logits="all", fresh=False)` -> (logits, cache): run T new
  tokens of every sequence at that sequence's own position `cache.lengths[b]`, write their keys/values and
  advance the lengths by `num_valid` (default T). This one entry point is prefill (ragged: `num_valid` =
  prompt lengths, `logits="last"`), decode (T = 1) and chunk scoring (T = k), on the dense `KVCache` (the
  reference) and on the `PagedKVCache` alike. `fresh=True` says every sequence starts empty: attention is
  then causal self-attention over the new tokens (splash / cuDNN / XLA), with no cache read, and the
  keys/values are only written. Rewind with `cache.rewind`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from motab_jax.models.attention import NO_EXTRAS, AttentionExtras, AttentionMask, attention
from motab_jax.models.config import ModelConfig
from motab_jax.models.kv_cache import KVCache
from motab_jax.models.moe import moe_mlp
from motab_jax.models.paged_attention import paged_attention
from motab_jax.models.paged_cache import PagedKVCache, pages_for_budget
from motab_jax.models.sharding import LogicalAxes

Init = Literal["normal", "ones", "zeros"]
# (cache, q, k, v, layer index, extras) -> (attention output, cache): how a block reads and writes its cache.
Attend = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array, AttentionExtras], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    name: str  # "embed", "final_norm", "lm_head" or "layers.<name>"
    axes: LogicalAxes
    init: Init = "normal"
    present: Callable[[ModelConfig], bool] = lambda cfg: True
    # Kept in float32 whatever the parameter dtype (gpt-oss's norm weights, as transformers keeps them).
    float32: Callable[[ModelConfig], bool] = lambda cfg: False


def _dense(cfg: ModelConfig) -> bool:
    return not cfg.is_moe


def _moe(cfg: ModelConfig) -> bool:
    return cfg.is_moe


def _norm_f32(cfg: ModelConfig) -> bool:
    return cfg.norm_weight_float32


PARAM_TABLE: tuple[ParamSpec, ...] = (
    ParamSpec("embed", ("vocab", "embed")),
    ParamSpec("layers.attn_norm", ("layers", "embed"), "ones", float32=_norm_f32),
    ParamSpec("layers.wq", ("layers", "embed", "heads", "head_dim")),
    ParamSpec("layers.wk", ("layers", "embed", "kv_heads", "head_dim")),
    ParamSpec("layers.wv", ("layers", "embed", "kv_heads", "head_dim")),
    ParamSpec("layers.bq", ("layers", "heads", "head_dim"), "zeros", lambda c: c.qkv_bias),
    ParamSpec("layers.bk", ("layers", "kv_heads", "head_dim"), "zeros", lambda c: c.qkv_bias),
    ParamSpec("layers.bv", ("layers", "kv_heads", "head_dim"), "zeros", lambda c: c.qkv_bias),
    ParamSpec("layers.q_norm", ("layers", "head_dim"), "ones", lambda c: c.qk_norm),
    ParamSpec("layers.k_norm", ("layers", "head_dim"), "ones", lambda c: c.qk_norm),
    ParamSpec("layers.wo", ("layers", "heads", "head_dim", "embed")),
    ParamSpec("layers.bo", ("layers", "embed"), "zeros", lambda c: c.o_bias),
    ParamSpec("layers.sinks", ("layers", "heads"), "normal", lambda c: c.attention_sinks),
    ParamSpec("layers.mlp_norm", ("layers", "embed"), "ones", float32=_norm_f32),
    ParamSpec("layers.w_gate", ("layers", "embed", "mlp"), present=_dense),
    ParamSpec("layers.w_up", ("layers", "embed", "mlp"), present=_dense),
    ParamSpec("layers.w_down", ("layers", "mlp", "embed"), present=_dense),
    ParamSpec("layers.b_gate", ("layers", "mlp"), "zeros", lambda c: c.mlp_bias and not c.is_moe),
    ParamSpec("layers.b_up", ("layers", "mlp"), "zeros", lambda c: c.mlp_bias and not c.is_moe),
    ParamSpec("layers.b_down", ("layers", "embed"), "zeros", lambda c: c.mlp_bias and not c.is_moe),
    # Mixture of experts (gpt-oss). The gate and up projections stay interleaved as released (unit j's gate
    # at column 2j, its up at 2j + 1): a split of `mlp_gate_up` keeps each unit's pair on one device.
    ParamSpec("layers.router", ("layers", "embed", "experts"), present=_moe),
    ParamSpec("layers.router_bias", ("layers", "experts"), present=_moe),
    ParamSpec("layers.expert_gate_up", ("layers", "experts", "embed", "mlp_gate_up"), present=_moe),
    ParamSpec("layers.expert_gate_up_bias", ("layers", "experts", "mlp_gate_up"), "zeros", _moe),
    ParamSpec("layers.expert_down", ("layers", "experts", "mlp", "embed"), present=_moe),
    ParamSpec("layers.expert_down_bias", ("layers", "experts", "embed"), "zeros", _moe),
    ParamSpec("final_norm", ("embed",), "ones", float32=_norm_f32),
    ParamSpec("lm_head", ("embed", "vocab"), "normal", lambda c: not c.tie_word_embeddings),
)


def axis_sizes(cfg: ModelConfig) -> dict[str, int]:
    return {"vocab": cfg.vocab_size, "embed": cfg.hidden_size, "heads": cfg.num_heads,
            "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "mlp": cfg.intermediate_size,
            "layers": cfg.num_layers, "experts": cfg.num_experts, "mlp_gate_up": 2 * cfg.intermediate_size}


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """The parameters `cfg` has, by name."""
    return {spec.name: spec for spec in PARAM_TABLE if spec.present(cfg)}


def param_shape(cfg: ModelConfig, spec: ParamSpec) -> tuple[int, ...]:
    sizes = axis_sizes(cfg)
    return tuple(sizes[a] for a in spec.axes)  # type: ignore[index]


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param_dtype(cfg: ModelConfig, spec: ParamSpec) -> jnp.dtype:
    """The dtype parameter `spec` is stored in."""
    return jnp.dtype(jnp.float32) if spec.float32(cfg) else _dtype(cfg.param_dtype)


class LayerStack(nnx.Module):
    """All layers' parameters, each stacked along a leading `layers` axis."""

    def __init__(self, params: dict[str, nnx.Param]):
        for name, param in params.items():
            setattr(self, name, param)


class Decoder(nnx.Module):
    """Decoder-only transformer; see the module docstring for the calling conventions."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        layer_params: dict[str, nnx.Param] = {}
        for name, spec in param_specs(config).items():
            shape = param_shape(config, spec)
            dtype = param_dtype(config, spec)
            if spec.init == "ones":
                value = jnp.ones(shape, dtype)
            elif spec.init == "zeros":
                value = jnp.zeros(shape, dtype)
            else:
                value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
            param = nnx.Param(value)
            if name.startswith("layers."):
                layer_params[name.removeprefix("layers.")] = param
            else:
                setattr(self, name, param)
        if config.tie_word_embeddings:
            self.lm_head = None
        self.layers = LayerStack(layer_params)

    # ------------------------------------------------------------------ public API
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens [B, T] int32 -> float32 logits [B, T, V]."""
        return self.logits(self.hidden_states(tokens, positions, segment_ids))

    def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden states [B, T, D] in the compute dtype (feed to `logits`, or chunk it)."""
        batch, length = tokens.shape
        index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        positions = index if positions is None else positions.astype(jnp.int32)
        segments = None if segment_ids is None else segment_ids.astype(jnp.int32)
        mask = AttentionMask(index, index, segments, segments, self_attention=True)
        x = self._embed(tokens)
        x, _ = self._run_layers(x, positions, mask)
        return self._final_norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Hidden states [..., D] -> float32 logits [..., V] over the first `output_vocab_size` rows."""
        cfg = self.config
        vocab = cfg.output_vocab_size
        compute = _dtype(cfg.compute_dtype)
        if self.lm_head is None:
            weight = self.embed[...][:vocab].astype(compute)
            return jnp.einsum("...d,vd->...v", hidden, weight, preferred_element_type=jnp.float32)
        weight = self.lm_head[...][:, :vocab].astype(compute)
        return jnp.einsum("...d,dv->...v", hidden, weight, preferred_element_type=jnp.float32)

    def init_cache(self, batch: int, max_length: int, dtype: str | None = None) -> KVCache:
        cfg = self.config
        return KVCache.zeros(cfg.num_layers, batch, max_length, cfg.num_kv_heads, cfg.head_dim,
                             _dtype(dtype or cfg.compute_dtype))

    def init_paged_cache(self, batch: int, max_length: int, *, page_size: int = 16, num_pages: int | None = None,
                         budget_bytes: float | None = None, dtype: str | None = None,
                         impl: str = "auto") -> PagedKVCache:
        """A page pool of `num_pages` pages (or as many as `budget_bytes` holds; default: enough for every
        sequence at `max_length`, plus the null page) and a page table for `batch` sequences of up to
        `max_length` tokens. Give sequences pages with a `PageAllocator` before extending them."""
        cfg = self.config
        dtype = _dtype(dtype or cfg.compute_dtype)
        pages_per_seq = -(-max_length // page_size)
        if num_pages is None:
            num_pages = (pages_for_budget(budget_bytes, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, page_size,
                                          dtype) if budget_bytes is not None else batch * pages_per_seq + 1)
        if cfg.attention_sinks or cfg.has_windows:
            # Only the reference paged path has sinks and sliding windows (see paged_attention's docstring).
            if impl not in ("auto", "reference"):
                raise ValueError(f"paged attention impl={impl!r} has no attention sinks or sliding windows, which "
                                 f"{cfg.model_type} needs; use impl='auto' or 'reference'")
            impl = "reference"
        return PagedKVCache.zeros(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                                  num_pages=num_pages, page_size=page_size, batch=batch, pages_per_seq=pages_per_seq,
                                  dtype=dtype, impl=impl)

    def extend(self, tokens: jax.Array, cache: KVCache | PagedKVCache, num_valid: jax.Array | None = None,
               logits: Literal["all", "last", "none"] = "all",
               fresh: bool = False) -> tuple[jax.Array | None, KVCache | PagedKVCache]:
        """Run tokens [B, T] at each sequence's position `cache.lengths`; see the module docstring.

        Returns logits [B, T, V] ("all"), [B, V] at each sequence's last valid token ("last") or None,
        and the cache with lengths advanced by `num_valid` [B] (default T). Dense cache: slots past a
        sequence's new length hold padding and are overwritten later; writes past `cache.max_length` are
        dropped. Paged cache: only the valid tokens are written; a valid token without a page is dropped
        and counted in `cache.dropped`. With `fresh`, every `cache.lengths` must be 0.
        """
        batch, length = tokens.shape
        starts = cache.lengths
        positions = starts[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
        num_valid = jnp.full((batch,), length, jnp.int32) if num_valid is None else num_valid.astype(jnp.int32)
        index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        self_mask = AttentionMask(index, index, self_attention=True)
        impl = self.config.attention_impl
        x = self._embed(tokens)
        if isinstance(cache, PagedKVCache):
            valid = jnp.arange(length, dtype=jnp.int32)[None, :] < num_valid[:, None]
            slots = cache.page_slots(positions, valid)

            def attend(c: PagedKVCache, q, k, v, layer, extras):
                c = c.write(layer, slots, k, v)
                if fresh:
                    return attention(q, k, v, self_mask, impl, extras), c
                return paged_attention(q, k, v, c, layer, starts, num_valid, extras), c

            x, written = self._run_layers(x, positions, self_mask, cache, attend)
            new_cache = dataclasses.replace(written, lengths=starts + num_valid,
                                            dropped=cache.dropped + (valid & ~slots[2]).sum(axis=1, dtype=jnp.int32))
        else:
            slots = jnp.broadcast_to(jnp.arange(cache.max_length, dtype=jnp.int32), (batch, cache.max_length))
            cache_mask = AttentionMask(positions, slots)

            def attend(kv, q, k, v, layer, extras):
                keys, values = kv
                rows = jnp.arange(batch)[:, None]
                keys = keys.at[layer, rows, positions].set(k.astype(keys.dtype), mode="drop")
                values = values.at[layer, rows, positions].set(v.astype(values.dtype), mode="drop")
                if fresh:
                    return attention(q, k, v, self_mask, impl, extras), (keys, values)
                k_all = jax.lax.dynamic_index_in_dim(keys, layer, 0, keepdims=False).astype(q.dtype)
                v_all = jax.lax.dynamic_index_in_dim(values, layer, 0, keepdims=False).astype(q.dtype)
                return attention(q, k_all, v_all, cache_mask, impl, extras), (keys, values)

            x, (keys, values) = self._run_layers(x, positions, self_mask, (cache.keys, cache.values), attend)
            new_cache = KVCache(keys, values, starts + num_valid)
        if logits == "none":
            return None, new_cache
        x = self._final_norm(x)
        if logits == "last":
            last = jnp.clip(num_valid - 1, 0, length - 1)
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        return self.logits(x), new_cache

    # ------------------------------------------------------------------ internals
    def _embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens, axis=0).astype(_dtype(self.config.compute_dtype))

    def _final_norm(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.final_norm[...], self.config.rms_norm_eps, self.config.norm_weight_float32)

    def _run_layers(self, x: jax.Array, positions: jax.Array, mask: AttentionMask, cache: Any = None,
                    attend: Attend | None = None):
        """All layers under `lax.scan`; `cache` (any pytree) is carried and updated by `attend`."""
        cfg = self.config
        compute = _dtype(cfg.compute_dtype)
        stacked = {name: var.get_value() for name, var in vars(self.layers).items() if isinstance(var, nnx.Param)}
        keep = {name.removeprefix("layers.") for name, spec in param_specs(cfg).items() if spec.float32(cfg)}
        cos, sin = rope_tables(cfg, positions)
        # The mesh the expert weights live on (a traced array carries its mesh, not its split; the split is
        # `cfg.expert_axes`), for the expert-parallel MoE layer.
        mesh = jax.typeof(stacked["expert_down"]).sharding.mesh if cfg.is_moe and cfg.expert_axes else None
        # Per-layer windows ride along the scan, so sliding and full layers share one compiled body.
        windows = jnp.asarray(cfg.layer_windows, jnp.int32) if cfg.has_windows else None

        def layer(carry, xs):
            x, kv = carry
            params, index, window = xs
            params = {k: v if k in keep else v.astype(compute) for k, v in params.items()}
            x, kv = decoder_layer(cfg, params, x, cos, sin, mask, kv, index, attend, window, mesh)
            return (x, kv), None

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        index = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, kv), _ = jax.lax.scan(layer, (x, cache), (stacked, index, windows))
        return x, kv


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, weight_float32: bool = False) -> jax.Array:
    """RMSNorm with float32 statistics, cast back before the weight (Llama/Qwen in Hugging Face) or, with
    `weight_float32`, after a float32 weight multiply (gpt-oss)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight_float32:
        return (weight.astype(jnp.float32) * xf).astype(x.dtype)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, 1, head_dim] for positions [B, T], in float32 (YaRN scales both by its attention factor)."""
    inv_freq = jnp.asarray(cfg.rope.inverse_frequencies(cfg.head_dim), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    scaling = cfg.rope.attention_scaling
    if scaling != 1.0:
        return jnp.cos(angles) * scaling, jnp.sin(angles) * scaling
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


def decoder_layer(cfg: ModelConfig, p: dict[str, jax.Array], x: jax.Array, cos: jax.Array, sin: jax.Array,
                  mask: AttentionMask, kv: Any, layer_index: jax.Array, attend: Attend | None = None,
                  window: jax.Array | None = None, mesh: Any = None):
    """One pre-norm block. Without `attend`, attention is over the block's own tokens under `mask`; with
    it, `attend(kv, q, k, v, layer_index, extras)` writes the new keys/values to the cache `kv` and attends.
    `window`: this layer's sliding window (0 = full), when the model has windows; `mesh`: where the experts
    live, for the expert-parallel MoE layer."""
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps, cfg.norm_weight_float32)
    q = jnp.einsum("btd,dhk->bthk", h, p["wq"])
    k = jnp.einsum("btd,dhk->bthk", h, p["wk"])
    v = jnp.einsum("btd,dhk->bthk", h, p["wv"])
    if cfg.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    extras = (AttentionExtras(p.get("sinks"), window, _window_size(cfg)) if cfg.attention_sinks or window is not None
              else NO_EXTRAS)
    if attend is None:
        out = attention(q, k, v, mask, cfg.attention_impl, extras)
    else:
        out, kv = attend(kv, q, k, v, layer_index, extras)
    x = x + jnp.einsum("bthk,hkd->btd", out, p["wo"])
    if cfg.o_bias:
        x = x + p["bo"]
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps, cfg.norm_weight_float32)
    if cfg.is_moe:
        return x + moe_mlp(cfg, p, h, cfg.moe_impl, mesh), kv
    gate = jnp.einsum("btd,df->btf", h, p["w_gate"])
    up = jnp.einsum("btd,df->btf", h, p["w_up"])
    if cfg.mlp_bias:
        gate, up = gate + p["b_gate"], up + p["b_up"]
    x = x + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, p["w_down"])
    if cfg.mlp_bias:
        x = x + p["b_down"]
    return x, kv


def _window_size(cfg: ModelConfig) -> int:
    """The model's one sliding window (0 when it has none, or several sizes)."""
    sizes = {w for w in cfg.layer_windows if w}
    return sizes.pop() if len(sizes) == 1 else 0


def abstract_decoder(config: ModelConfig) -> Decoder:
    """A Decoder whose parameters are shape/dtype placeholders (no memory), for loading into."""
    return nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))


def param_values(model: Decoder) -> dict[str, jax.Array]:
    """Flat {name: array} of the model's parameters, names as in `PARAM_TABLE`."""
    out: dict[str, jax.Array] = {}
    for name in param_specs(model.config):
        owner = model.layers if name.startswith("layers.") else model
        out[name] = getattr(owner, name.removeprefix("layers.")).get_value()
    return out


def set_param_values(model: Decoder, values: dict[str, jax.Array | np.ndarray]) -> None:
    """Replace parameters in place by name (shapes must match `PARAM_TABLE`)."""
    specs = param_specs(model.config)
    for name, value in values.items():
        expected = param_shape(model.config, specs[name])
        if tuple(value.shape) != expected:
            raise ValueError(f"parameter {name}: shape {tuple(value.shape)} != expected {expected}")
        owner = model.layers if name.startswith("layers.") else model
        getattr(owner, name.removeprefix("layers.")).set_value(value)
