"""The job behind `run.py`: validated config -> stages run in order inside one run directory."""

from motab_jax.pipeline.runner import STAGES, run_pipeline
from motab_jax.pipeline.validation import ConfigError, preflight, validate_config

__all__ = ["STAGES", "ConfigError", "preflight", "run_pipeline", "validate_config"]
