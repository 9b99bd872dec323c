"""Stage registry and the resumable runner.

Each stage writes its outputs into the run directory and then a `stages/<name>.done` marker (written
last, atomically), so a rerun of the same command skips finished stages and redoes an interrupted one
(which itself resumes: synthesis per record, training from its last checkpoint, evaluation per sample).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax

from motab_jax.models.sharding import MeshConfig, initialize_distributed, make_mesh
from motab_jax.pipeline.models_stage import run_models_stage
from motab_jax.pipeline.stages import (
    run_eval_stage,
    run_kd_stage,
    run_pretrain_stage,
    run_sft_stage,
    run_synthesize_stage,
)
from motab_jax.pipeline.summary import final_summary
from motab_jax.pipeline.validation import STAGE_NAMES, ConfigError, preflight, stages_of, validate_config

log = logging.getLogger("motab_jax")

Stage = Callable[[Any, Path, Any], dict[str, Any]]
STAGES: dict[str, Stage] = {"models": run_models_stage, "pretrain": run_pretrain_stage,
                            "synthesize": run_synthesize_stage, "sft": run_sft_stage, "kd": run_kd_stage,
                            "eval": run_eval_stage}
assert tuple(STAGES) == STAGE_NAMES

__all__ = ["STAGES", "ConfigError", "run_pipeline", "validate_config"]


def _log_to_file(run_dir: Path) -> logging.Handler:
    """Append this process's log to run_dir/run.log (every rerun adds to it, so the history stays)."""
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    return handler


def _enable_compilation_cache(config: Any, run_dir: Path) -> None:
    """Keep compiled programs on disk, so a rerun after a kill or a preemption does not compile again."""
    folder = str(config.compilation_cache_dir)
    if not folder or os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # off, or the user set JAX's own variable
        return
    path = run_dir / "jax_cache" if folder == "auto" else Path(folder).expanduser()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def run_pipeline(config: Any) -> dict[str, Any]:
    """Validate `config`, then run its stages; returns {stage: summary}."""
    dist = config.distributed
    if int(dist.num_processes) != 1:
        initialize_distributed(dist.coordinator_address or None, int(dist.num_processes) or None,
                               int(dist.process_id) if int(dist.num_processes) else None)
    problems = validate_config(config)
    if not problems:
        problems = preflight(config)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    run_dir = Path(config.run_dir)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    handler = _log_to_file(run_dir)
    _enable_compilation_cache(config, run_dir)
    try:
        return _run_stages(config, run_dir)
    except Exception:
        # The full traceback goes to run.log only: run.py shows input and environment errors as one message.
        record = logging.LogRecord(log.name, logging.ERROR, __file__, 0, "the job stopped; rerun the same command "
                                   "to continue from the last finished work", None, sys.exc_info())
        handler.handle(record)
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


def _run_stages(config: Any, run_dir: Path) -> dict[str, Any]:
    (run_dir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    mesh = make_mesh(MeshConfig(**config.mesh))
    log.info("run directory %s; mesh %s over %d %s device(s)", run_dir, dict(mesh.shape), mesh.size,
             jax.default_backend())
    job_start = time.monotonic()
    summaries: dict[str, Any] = {}
    for stage in stages_of(config):
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
    recorded = {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "stages").glob("*.done"))}
    text = final_summary({s: recorded[s] for s in STAGE_NAMES if s in recorded}, time.monotonic() - job_start)
    (run_dir / "results.md").write_text(text + "\n")
    log.info("results written to %s", run_dir / "results.md")
    return summaries
