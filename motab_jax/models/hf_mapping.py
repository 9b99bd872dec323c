"""Declarative map between Hugging Face tensor names/layouts and our parameters.

Each row names an HF tensor (with `{i}` for the layer index), our parameter, and the layout change.
Hugging Face linear weights are [out, in]; ours are [in, *out] with heads split out, so the attention
projections need no reshapes in the forward pass. Loading and export both read this one table.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from motab_jax.models.config import ModelConfig
from motab_jax.models.transformer import param_shape, param_specs


@dataclasses.dataclass(frozen=True)
class HFKey:
    hf_name: str  # "model.layers.{i}.self_attn.q_proj.weight"
    param: str  # "layers.wq"
    transposed_in_axes: int = 0  # >0: HF [out, in] with `in` = our first n axes (per layer)
    flattened: bool = False  # HF stores our [heads, head_dim] as one [heads * head_dim] vector

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name

    def to_ours(self, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """HF tensor -> our layout `shape` (one layer's shape for stacked parameters)."""
        if self.transposed_in_axes:
            hf = hf.T
        if math.prod(hf.shape) != math.prod(shape):
            raise ValueError(f"{self.hf_name}: {hf.shape} cannot be laid out as {self.param} {shape}")
        return hf.reshape(shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """Our tensor (one layer) -> HF layout."""
        if self.transposed_in_axes:
            n = self.transposed_in_axes
            return ours.reshape(math.prod(ours.shape[:n]), -1).T
        return ours.reshape(-1) if self.flattened else ours


_L = "model.layers.{i}."
HF_TABLE: tuple[HFKey, ...] = (
    HFKey("model.embed_tokens.weight", "embed"),
    HFKey(_L + "input_layernorm.weight", "layers.attn_norm"),
    HFKey(_L + "self_attn.q_proj.weight", "layers.wq", 1),
    HFKey(_L + "self_attn.k_proj.weight", "layers.wk", 1),
    HFKey(_L + "self_attn.v_proj.weight", "layers.wv", 1),
    HFKey(_L + "self_attn.q_proj.bias", "layers.bq", flattened=True),
    HFKey(_L + "self_attn.k_proj.bias", "layers.bk", flattened=True),
    HFKey(_L + "self_attn.v_proj.bias", "layers.bv", flattened=True),
    HFKey(_L + "self_attn.q_norm.weight", "layers.q_norm"),
    HFKey(_L + "self_attn.k_norm.weight", "layers.k_norm"),
    HFKey(_L + "self_attn.o_proj.weight", "layers.wo", 2),
    HFKey(_L + "self_attn.o_proj.bias", "layers.bo"),
    HFKey(_L + "post_attention_layernorm.weight", "layers.mlp_norm"),
    HFKey(_L + "mlp.gate_proj.weight", "layers.w_gate", 1),
    HFKey(_L + "mlp.up_proj.weight", "layers.w_up", 1),
    HFKey(_L + "mlp.down_proj.weight", "layers.w_down", 1),
    HFKey(_L + "mlp.gate_proj.bias", "layers.b_gate"),
    HFKey(_L + "mlp.up_proj.bias", "layers.b_up"),
    HFKey(_L + "mlp.down_proj.bias", "layers.b_down"),
    # gpt-oss: sinks, router, experts (stored [E, in, out] already, and gate/up interleaved as we keep them).
    HFKey(_L + "self_attn.sinks", "layers.sinks"),
    HFKey(_L + "mlp.router.weight", "layers.router", 1),
    HFKey(_L + "mlp.router.bias", "layers.router_bias"),
    HFKey(_L + "mlp.experts.gate_up_proj", "layers.expert_gate_up"),
    HFKey(_L + "mlp.experts.gate_up_proj_bias", "layers.expert_gate_up_bias"),
    HFKey(_L + "mlp.experts.down_proj", "layers.expert_down"),
    HFKey(_L + "mlp.experts.down_proj_bias", "layers.expert_down_bias"),
    HFKey("model.norm.weight", "final_norm"),
    HFKey("lm_head.weight", "lm_head", 1),
)


def hf_keys(cfg: ModelConfig) -> list[HFKey]:
    """The table rows for the parameters `cfg` has."""
    present = param_specs(cfg)
    return [key for key in HF_TABLE if key.param in present]


def layer_shape(cfg: ModelConfig, key: HFKey) -> tuple[int, ...]:
    """Our shape of one layer's slice (or the whole parameter if not stacked)."""
    shape = param_shape(cfg, param_specs(cfg)[key.param])
    return shape[1:] if key.per_layer else shape
