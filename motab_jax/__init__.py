"""motab-jax: MOTAB reasoning distillation (monitor, backtrack, stitch) in JAX/Flax."""

from motab_jax.models import Decoder, KVCache, MeshConfig, ModelConfig, export_hf, load, make_mesh
from motab_jax.motab import synthesize
from motab_jax.sampling import Completion, generate

__version__ = "0.1.0"
__all__ = ["Completion", "Decoder", "KVCache", "MeshConfig", "ModelConfig", "export_hf", "generate", "load",
           "make_mesh", "synthesize"]
