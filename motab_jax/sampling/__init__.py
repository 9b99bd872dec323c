"""Sampling: token-selection rules, the KV-cached decode loop, and `generate`."""

from motab_jax.sampling.generate import Completion, generate
from motab_jax.sampling.rules import Greedy, Sample, make_rule, nucleus_mask
from motab_jax.sampling.sampler import DecodeState, SamplerLoop, sample_batch

__all__ = ["Completion", "DecodeState", "Greedy", "Sample", "SamplerLoop", "generate", "make_rule", "nucleus_mask",
           "sample_batch"]
