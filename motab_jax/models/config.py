"""Typed model configuration, read from (and written back to) a Hugging Face `config.json`.

One decoder covers the supported families; the family only decides which optional parts exist
(q/k/v biases for Qwen2, per-head q/k RMSNorm for Qwen3; for gpt-oss a mixture-of-experts MLP, attention
sinks, per-layer sliding windows, YaRN RoPE and float32 norm weights) and how `config.json` is written back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Literal, get_args

import numpy as np
from motab_jax.errors import MotabInputError

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",  # Llama 2/3.x, SmolLM/SmolLM2, any Llama-architecture checkpoint
    "qwen2": "Qwen2ForCausalLM",  # Qwen2 / Qwen2.5
    "qwen3": "Qwen3ForCausalLM",  # Qwen3 dense
    "gpt_oss": "GptOssForCausalLM",  # gpt-oss-20b / gpt-oss-120b (mixture of experts)
}
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "yarn")
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
AttentionImpl = Literal["auto", "xla", "jax", "cudnn", "splash", "pallas_gpu"]
DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


class UnsupportedModelError(MotabInputError):
    """The checkpoint uses an architecture or option this package does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (`rope_type` "default", "llama3", "linear" or "yarn")."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # YaRN (gpt-oss: beta_fast 32, beta_slow 1, not truncated; attention_factor 0 = 0.1 ln(factor) + 1).
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 0.0

    @property
    def attention_scaling(self) -> float:
        """The factor YaRN multiplies cos and sin by (1 for the other types)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor:
            return self.attention_factor
        return 1.0 if self.factor <= 1 else 0.1 * math.log(self.factor) + 1.0

    def inverse_frequencies(self, head_dim: int) -> np.ndarray:
        """Per-pair inverse frequencies [head_dim // 2] in float64, as Hugging Face computes them."""
        inv_freq = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        # HF computes in float32: match it so positions far out still agree to 1e-6.
        inv_freq = inv_freq.astype(np.float32).astype(np.float64)
        if self.rope_type == "linear":
            return inv_freq / self.factor
        if self.rope_type == "llama3":
            old_len = self.original_max_position_embeddings
            low_wavelen = old_len / self.low_freq_factor
            high_wavelen = old_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
            smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, scaled)
        if self.rope_type == "yarn":
            return self._yarn(inv_freq, head_dim)
        return inv_freq

    def _yarn(self, inv_freq: np.ndarray, head_dim: int) -> np.ndarray:
        """YaRN (arXiv 2309.00071) as transformers computes it: interpolated below the correction range,
        extrapolated above it, a linear ramp between."""
        def correction_dim(rotations: float) -> float:
            return (head_dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi))
                    / (2 * math.log(self.theta)))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # as transformers does, to avoid a division by zero
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float64)
        extrapolation = 1 - ramp
        interpolated = (inv_freq / self.factor).astype(np.float32).astype(np.float64)
        return interpolated * (1 - extrapolation) + inv_freq * extrapolation


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs; hashable so it can be a static jit argument."""

    model_type: str  # one of SUPPORTED_MODEL_TYPES
    vocab_size: int  # rows of the embedding / LM head (may exceed the tokenizer's vocabulary)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (and Llama/Qwen3 with attention_bias=True)
    o_bias: bool = False  # Llama/Qwen3 attention_bias=True also biases o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    # Mixture of experts (gpt-oss): `intermediate_size` is then each expert's. The router picks
    # `experts_per_token` of `num_experts` by raw logit and weights them by a softmax over those k logits.
    num_experts: int = 0
    experts_per_token: int = 0
    swiglu_limit: float = 7.0  # the experts' clamped SwiGLU: gate <= limit, |up| <= limit
    swiglu_alpha: float = 1.702
    # "grouped" (ragged_dot over the routed assignments), "dense" (all experts: the reference) or "auto" (grouped on
    # GPU/TPU, dense on CPU; models.moe).
    moe_impl: str = "auto"
    # Mesh axes the experts dimension is split over: set by loading from the placement rules (`expert_axes_for`),
    # read by the MoE layer to run expert-parallel; () = every device holds every expert.
    expert_axes: tuple[str, ...] = ()
    # Per-layer attention window (keys with position > query - window); 0 = full causal. gpt-oss: 128 on even
    # layers. Scanned with the layers, so one compiled layer serves both kinds.
    layer_windows: tuple[int, ...] = ()
    attention_sinks: bool = False  # a learned per-head logit in every softmax, dropped afterwards (gpt-oss)
    norm_weight_float32: bool = False  # RMSNorm multiplies its weight in float32, then casts (gpt-oss)
    # Logits are returned over the first `logits_vocab_size` rows: the tokenizer's vocabulary, so that
    # two models whose embeddings are padded differently (151936 vs 152064 rows) line up. 0 = all rows.
    logits_vocab_size: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Dtype policy: parameters are stored in `param_dtype`, matmuls run in `compute_dtype`,
    # normalisation statistics and logits are float32.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: RematPolicy = "none"
    attention_impl: AttentionImpl = "auto"
    # The original config.json (as sorted JSON), so export writes back every field we do not model.
    source_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for field in ("param_dtype", "compute_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{field}={getattr(self, field)!r}; accepted: {sorted(DTYPES)}")
        if self.remat not in get_args(RematPolicy):
            raise ValueError(f"remat={self.remat!r}; accepted: {get_args(RematPolicy)}")
        if self.attention_impl not in get_args(AttentionImpl):
            raise ValueError(f"attention_impl={self.attention_impl!r}; accepted: {get_args(AttentionImpl)}")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token={self.experts_per_token} must be in [1, num_experts="
                             f"{self.num_experts}]")
        if self.moe_impl not in ("auto", "grouped", "dense"):
            raise ValueError(f"moe_impl={self.moe_impl!r}; accepted: 'auto', 'grouped', 'dense'")
        if self.layer_windows and len(self.layer_windows) != self.num_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers")
        if not 0 <= self.logits_vocab_size <= self.vocab_size:
            raise ValueError(f"logits_vocab_size={self.logits_vocab_size} must be in [0, vocab_size={self.vocab_size}]")

    @property
    def output_vocab_size(self) -> int:
        """Width of the logits the model returns."""
        return self.logits_vocab_size or self.vocab_size

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def has_windows(self) -> bool:
        return any(self.layer_windows)

    def _expert_params(self) -> int:
        """One expert's MLP parameters (with biases for MoE experts)."""
        d, f = self.hidden_size, self.intermediate_size
        return 3 * d * f + (2 * f + d) * self.is_moe + (2 * f + d) * (self.mlp_bias and not self.is_moe)

    def _params(self, experts: int) -> int:
        d, h, k, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        per_layer = d * (h + 2 * k) * hd + h * hd * d + 2 * d
        per_layer += (h + 2 * k) * hd * self.qkv_bias + d * self.o_bias + 2 * hd * self.qk_norm
        per_layer += h * self.attention_sinks
        per_layer += experts * self._expert_params() + (d + 1) * self.num_experts
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_layers * per_layer + self.vocab_size * d + head + d

    @property
    def num_params(self) -> int:
        return self._params(self.num_experts or 1)

    @property
    def num_active_params(self) -> int:
        """Parameters one token's forward reads: all but the experts it is not routed to and the embedding
        rows of other tokens (gpt-oss-120b: 5.1 B of 116.8 B, as OpenAI counts them)."""
        embedding_rows = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self._params(self.experts_per_token or 1) - embedding_rows


def _read_rope(hf: dict[str, Any], source: str) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older checkpoints (all of the hub's Llama/Qwen) write
    # `rope_theta` plus an optional `rope_scaling` dict.
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{source}: rope_type {rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError(f"{source}: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "yarn":
        return RopeConfig(
            theta=theta, rope_type="yarn", factor=float(params["factor"]),
            beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
            truncate=bool(params.get("truncate", True)), attention_factor=float(params.get("attention_factor") or 0.0),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings",
                                                            hf.get("max_position_embeddings", 4096))))
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(params["factor"]))
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
        ),
    )


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json", **overrides: Any) -> ModelConfig:
    """Build a `ModelConfig` from a Hugging Face config dict; unsupported options raise clearly."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported; supported model types: "
            f"{sorted(SUPPORTED_MODEL_TYPES)} (gpt-oss, Llama 3.x / SmolLM2, Qwen2 / Qwen2.5, Qwen3)"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported; supported: 'silu'")
    if model_type != "gpt_oss" and hf.get("use_sliding_window"):
        raise UnsupportedModelError(f"{source}: use_sliding_window=true is not supported (full attention only)")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"{source}: missing required fields {missing}")
    num_heads = int(hf["num_attention_heads"])
    attention_bias = bool(hf.get("attention_bias", False))
    eos = hf.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
    fields = dict(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=_read_rope(hf, source),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
        source_config_json=json.dumps(hf, sort_keys=True),
    )
    if model_type == "gpt_oss":
        fields.update(_gpt_oss_fields(hf, source))
    fields.update(overrides)
    return ModelConfig(**fields)


def _gpt_oss_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """What gpt-oss adds: experts, sinks, per-layer windows (transformers' default layer_types: sliding on even
    layers), float32 norm weights, q/k/v/o biases."""
    layers = int(hf["num_hidden_layers"])
    layer_types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                            for i in range(layers)]
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown or len(layer_types) != layers:
        raise UnsupportedModelError(f"{source}: layer_types {unknown or layer_types} not supported; expected one of "
                                    "'sliding_attention' / 'full_attention' per layer")
    window = int(hf.get("sliding_window") or 0)
    experts = hf.get("num_local_experts", hf.get("num_experts"))
    top_k = hf.get("num_experts_per_tok", hf.get("experts_per_token"))
    if not experts or not top_k:
        raise ValueError(f"{source}: gpt_oss needs num_local_experts and num_experts_per_tok")
    bias = bool(hf.get("attention_bias", True))
    return dict(num_experts=int(experts), experts_per_token=int(top_k),
                swiglu_limit=float(hf.get("swiglu_limit", 7.0)), swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
                layer_windows=tuple(window if t == "sliding_attention" else 0 for t in layer_types),
                attention_sinks=True, norm_weight_float32=True, qkv_bias=bias, o_bias=bias, mlp_bias=False,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The `config.json` dict for `cfg`: the source config with our modelled fields written over it."""
    hf = json.loads(cfg.source_config_json or "{}")
    for stale in ("rope_scaling", "rope_parameters", "torch_dtype", "_name_or_path", "transformers_version"):
        hf.pop(stale, None)
    rope: dict[str, Any] = {"rope_type": cfg.rope.rope_type, "rope_theta": cfg.rope.theta}
    if cfg.rope.rope_type != "default":
        rope["factor"] = cfg.rope.factor
    if cfg.rope.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope.low_freq_factor, high_freq_factor=cfg.rope.high_freq_factor,
                    original_max_position_embeddings=cfg.rope.original_max_position_embeddings)
    if cfg.rope.rope_type == "yarn":
        rope.update(beta_fast=cfg.rope.beta_fast, beta_slow=cfg.rope.beta_slow, truncate=cfg.rope.truncate,
                    original_max_position_embeddings=cfg.rope.original_max_position_embeddings)
        if cfg.rope.attention_factor:
            rope["attention_factor"] = cfg.rope.attention_factor
    eos: Any = list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0]
    hf.update(
        model_type=cfg.model_type,
        architectures=[SUPPORTED_MODEL_TYPES[cfg.model_type]],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=eos if cfg.eos_token_ids else None,
        pad_token_id=cfg.pad_token_id,
        dtype=cfg.param_dtype,
        # Old key names as well: serving stacks and older transformers read these.
        rope_theta=cfg.rope.theta,
    )
    hf["rope_parameters"] = rope
    if cfg.rope.rope_type != "default":
        hf["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if cfg.model_type == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.model_type == "qwen3":
        hf.update(attention_bias=cfg.qkv_bias)
    elif cfg.model_type == "gpt_oss":
        # Exported dequantized (bf16 experts): the MXFP4 quantization_config no longer describes the tensors.
        hf.pop("quantization_config", None)
        hf.update(attention_bias=cfg.qkv_bias, num_local_experts=cfg.num_experts,
                  num_experts_per_tok=cfg.experts_per_token, experts_per_token=cfg.experts_per_token,
                  swiglu_limit=cfg.swiglu_limit, swiglu_alpha=cfg.swiglu_alpha,
                  sliding_window=max(cfg.layer_windows, default=0) or None,
                  layer_types=["sliding_attention" if w else "full_attention" for w in cfg.layer_windows])
    return hf
