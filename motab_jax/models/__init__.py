"""Models: the decoder, its configuration, KV caches (dense and paged), sharding rules, loading and export."""

from motab_jax.models.config import ModelConfig, RopeConfig, UnsupportedModelError, config_from_hf, config_to_hf
from motab_jax.models.export import export_hf
from motab_jax.models.kv_cache import KVCache
from motab_jax.models.loading import init_random, load, param_shardings
from motab_jax.models.paged_attention import PAGED_IMPLS
from motab_jax.models.paged_cache import PageAllocator, PagedKVCache, PagePoolExhausted
from motab_jax.models.sharding import DEFAULT_RULES, MeshConfig, initialize_distributed, logical_to_spec, make_mesh
from motab_jax.models.transformer import Decoder, abstract_decoder, param_values, set_param_values

__all__ = [
    "DEFAULT_RULES", "Decoder", "KVCache", "MeshConfig", "ModelConfig", "PAGED_IMPLS", "PageAllocator",
    "PagePoolExhausted", "PagedKVCache", "RopeConfig", "UnsupportedModelError",
    "abstract_decoder", "config_from_hf", "config_to_hf", "export_hf", "init_random", "initialize_distributed", "load",
    "logical_to_spec", "make_mesh", "param_shardings", "param_values", "set_param_values",
]
