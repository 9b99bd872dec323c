"""Stage registry and the resumable runner.

One job at a time holds a run directory (`run_lock`). Each stage records the settings it depends on when it
starts (`stage_inputs`), writes its outputs into the run directory and then a `stages/<name>.done` marker
(written last, atomically), so a rerun of the same command skips finished stages and redoes an interrupted one
(which itself resumes: synthesis per record, training from its last good checkpoint, evaluation per sample),
while a rerun with changed settings is refused (or redone on request) before anything is touched.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax

from motab_jax.models.sharding import MeshConfig, initialize_distributed, make_mesh
from motab_jax.errors import EnvironmentProblem, MotabInputError, environment_problem
from motab_jax.pipeline.models_stage import run_models_stage
from motab_jax.pipeline.multihost import (GENERATION_STAGES, check_shared_run_dir, generation_plan, report_failure,
                                          wait_for_all)
from motab_jax.pipeline.run_lock import acquire_run_dir
from motab_jax.pipeline.stage_inputs import (UnfinishedInput, apply_plan, begin_stage, check_stages, check_unfinished,
                                              done_path, unfinished_inputs)
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
    """Append this process's log to run_dir/run.log (every rerun adds to it, so the history stays); the other
    processes of a multi-host job to run.process<i>.log."""
    name = "run.log" if jax.process_index() == 0 else f"run.process{jax.process_index()}.log"
    handler = logging.FileHandler(run_dir / name, encoding="utf-8")
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


def _make_run_dir(run_dir: Path) -> None:
    try:
        (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        what = "is a file, not a folder" if e.errno in (errno.EEXIST, errno.ENOTDIR) else e.strerror
        raise EnvironmentProblem(f"run_dir={str(run_dir)!r}: cannot create the run directory ({what}); give a "
                                 "folder path on a writable disk") from e


def _as_environment_problem(error: BaseException, stage: str, run_dir: Path) -> MotabInputError | None:
    """A full / read-only disk met while a stage wrote into run_dir, as the one-line error run.py prints."""
    if not isinstance(error, OSError):
        return None
    doing = "" if error.filename else f"stage {stage} writing into {run_dir}"
    return environment_problem(error, doing)


def run_pipeline(config: Any) -> dict[str, Any]:
    """Validate `config`, then run its stages; returns {stage: summary}."""
    dist = config.distributed
    if int(dist.num_processes) != 1:
        initialize_distributed(dist.coordinator_address or None, int(dist.num_processes) or None,
                               int(dist.process_id) if int(dist.num_processes) else None)
    try:
        return _run_pipeline(config)
    except BaseException as e:  # errors, Ctrl-C, SIGTERM: the other processes stop waiting for this one
        report_failure(e)
        raise


def _run_pipeline(config: Any) -> dict[str, Any]:
    problems = validate_config(config)
    if not problems:
        problems = preflight(config)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    run_dir = Path(config.run_dir)
    _make_run_dir(run_dir)
    # One job per run directory; the other processes of a multi-host job share process 0's (and must see it).
    lock = acquire_run_dir(run_dir) if jax.process_index() == 0 else None
    try:
        check_shared_run_dir(run_dir)
        handler = _log_to_file(run_dir)
        _enable_compilation_cache(config, run_dir)
        try:
            return _run_stages(config, run_dir)
        except Exception:
            # The full traceback goes to run.log only: run.py shows input and environment errors as one message.
            record = logging.LogRecord(log.name, logging.ERROR, __file__, 0, "the job stopped; rerun the same "
                                       "command to continue from the last finished work", None, sys.exc_info())
            handler.handle(record)
            raise
        finally:
            log.removeHandler(handler)
            handler.close()
    finally:
        if lock is not None:
            lock.release()


def _sync(name: str) -> None:
    """A barrier of all processes of a multi-host job (nothing with one process); raises when another process
    stopped with an error."""
    wait_for_all(name)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _run_stages(config: Any, run_dir: Path) -> dict[str, Any]:
    stages = stages_of(config)
    primary = jax.process_index() == 0
    # Before anything is written: the directory's recorded stages agree with this config (or are redone), and
    # no stage will read unfinished outputs. Then config.json describes the data the directory holds. Every
    # process checks; process 0 alone changes the directory, while the others wait.
    plan = check_stages(config, run_dir, stages)
    _sync("motab: stage inputs checked")
    if primary:
        apply_plan(config, run_dir, plan)
        _write_atomically(run_dir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True))
    _sync("motab: stage inputs applied")
    check_unfinished(config, run_dir, stages)
    mesh = make_mesh(MeshConfig(**config.mesh))
    log.info("run directory %s; mesh %s over %d %s device(s)", run_dir, dict(mesh.shape), mesh.size,
             jax.default_backend())
    if jax.process_count() > 1 and set(GENERATION_STAGES) & set(stages):
        plan = generation_plan(config)
        log.info("process %d of %d; synthesize / eval: %s (%s)", jax.process_index(), jax.process_count(), plan.mode,
                 plan.why)
    job_start = time.monotonic()
    summaries: dict[str, Any] = {}
    for stage in stages:
        done = done_path(run_dir, stage)
        if done.exists():
            log.info("stage %s: already finished, skipped (redo it with --config.redo=%s after changing its "
                     "settings)", stage, stage)
            summaries[stage] = json.loads(done.read_text())
            continue
        missing = unfinished_inputs(config, run_dir, stage)
        if missing:
            raise UnfinishedInput(missing)
        begin_stage(config, run_dir, stage, write=primary)
        start = time.monotonic()
        log.info("stage %s: started", stage)
        try:
            summary = STAGES[stage](config, run_dir, mesh)
            summary["seconds"] = round(time.monotonic() - start, 2)
            if primary:  # process 0's summary (a data-parallel generation stage merges the outputs there)
                _write_atomically(done, json.dumps(summary, indent=2))
        except OSError as e:
            problem = _as_environment_problem(e, stage, run_dir)
            if problem is None:
                raise
            raise problem from e
        _sync(f"motab: stage {stage} finished")
        if not primary:
            summary = json.loads(done.read_text())
        log.info("stage %s: finished in %.1f s", stage, summary["seconds"])
        summaries[stage] = summary
    recorded = {s: json.loads(done_path(run_dir, s).read_text()) for s in STAGE_NAMES if done_path(run_dir, s).exists()}
    text = final_summary(recorded, time.monotonic() - job_start)
    if primary:
        _write_atomically(run_dir / "results.md", text + "\n")
        log.info("results written to %s", run_dir / "results.md")
    _sync("motab: results written")
    return summaries
