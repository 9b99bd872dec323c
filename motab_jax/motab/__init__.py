"""MOTAB synthesis: the monitored draft-verify engine, its policies, and record output."""

from motab_jax.motab.delimiter import DelimiterTables, build_delimiter_tables
from motab_jax.motab.engine import EngineSpec, root_cause, topk_entropy
from motab_jax.motab.policies import Motab, Policy, SkdStep, SkdToken, StudentOnly, TeacherOnly, make_policy
from motab_jax.motab.synthesize import DEFAULTS, synthesize

__all__ = ["DEFAULTS", "DelimiterTables", "EngineSpec", "Motab", "Policy", "SkdStep", "SkdToken", "StudentOnly",
           "TeacherOnly", "build_delimiter_tables", "make_policy", "root_cause", "synthesize", "topk_entropy"]
