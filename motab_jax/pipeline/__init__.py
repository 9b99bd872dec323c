"""The job behind `run.py`: validated config -> stages run in order inside one run directory."""

from motab_jax.pipeline.runner import STAGES, run_pipeline, validate_config

__all__ = ["STAGES", "run_pipeline", "validate_config"]
