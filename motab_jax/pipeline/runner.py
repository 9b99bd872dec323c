"""Stage registry and the resumable runner.

Each stage writes its outputs into the run directory and then a `stages/<name>.done` marker (written
last, atomically), so a rerun of the same command skips finished stages and redoes an interrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax

from motab_jax.models.factory import validate_model_spec
from motab_jax.models.sharding import MeshConfig, initialize_distributed, make_mesh
from motab_jax.pipeline.models_stage import run_models_stage
from motab_jax.pipeline.stages import (
    run_eval_stage,
    run_kd_stage,
    run_pretrain_stage,
    run_sft_stage,
    run_synthesize_stage,
)

log = logging.getLogger("motab_jax")

Stage = Callable[[Any, Path, Any], dict[str, Any]]
STAGES: dict[str, Stage] = {"models": run_models_stage, "pretrain": run_pretrain_stage,
                            "synthesize": run_synthesize_stage, "sft": run_sft_stage, "kd": run_kd_stage,
                            "eval": run_eval_stage}


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem found."""


def validate_config(config: Any) -> list[str]:
    """All problems in `config` (empty when valid), checked before any heavy work."""
    problems: list[str] = []
    stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
    if not stages:
        problems.append("stages is empty: give a comma-separated list, e.g. 'models'")
    for stage in stages:
        if stage not in STAGES:
            problems.append(f"stages: unknown stage {stage!r}; implemented: {sorted(STAGES)}")
    for name in ("teacher", "student"):
        problems += validate_model_spec(config[name], name)
    try:
        MeshConfig(**config.mesh).shape(jax.device_count())
    except (ValueError, TypeError) as e:
        problems.append(f"mesh: {e}")
    if not str(config.run_dir):
        problems.append("run_dir is empty: give a folder for the job's outputs")
    return problems


def run_pipeline(config: Any) -> dict[str, Any]:
    """Validate `config`, then run its stages; returns {stage: summary}."""
    dist = config.distributed
    if int(dist.num_processes) != 1:
        initialize_distributed(dist.coordinator_address or None, int(dist.num_processes) or None,
                               int(dist.process_id) if int(dist.num_processes) else None)
    problems = validate_config(config)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    run_dir = Path(config.run_dir)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    mesh = make_mesh(MeshConfig(**config.mesh))
    log.info("run directory %s; mesh %s over %d %s device(s)", run_dir, dict(mesh.shape), mesh.size,
             jax.default_backend())
    summaries: dict[str, Any] = {}
    for stage in [s.strip() for s in str(config.stages).split(",") if s.strip()]:
        done = run_dir / "stages" / f"{stage}.done"
        if done.exists():
            log.info("stage %s: already finished, skipped (delete %s to redo it)", stage, done)
            summaries[stage] = json.loads(done.read_text())
            continue
        start = time.monotonic()
        log.info("stage %s: started", stage)
        summary = STAGES[stage](config, run_dir, mesh)
        summary["seconds"] = round(time.monotonic() - start, 2)
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(done)
        log.info("stage %s: finished in %.1f s", stage, summary["seconds"])
        summaries[stage] = summary
    return summaries
