"""MOTAB synthesis: the monitored draft-verify engine, its policies, and record output."""

from motab_jax.motab.config import DEFAULTS, SynthesisConfig
from motab_jax.motab.delimiter import DelimiterTables, build_delimiter_tables
from motab_jax.motab.engine import EngineSpec, topk_entropy
from motab_jax.motab.policies import Motab, Plain, Policy, SkdStep, SkdToken, StudentOnly, TeacherOnly, make_policy
from motab_jax.motab.synthesize import synthesize
from motab_jax.motab.transition import root_cause

__all__ = ["DEFAULTS", "DelimiterTables", "EngineSpec", "Motab", "Plain", "Policy", "SkdStep", "SkdToken", "StudentOnly",
           "SynthesisConfig", "TeacherOnly", "build_delimiter_tables", "make_policy", "root_cause", "synthesize",
           "topk_entropy"]
