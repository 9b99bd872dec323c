"""One run directory, one job, one set of settings: the lock, stage inputs (drift, redo, amend), unfinished inputs.

The runner tests replace the stage functions with stand-ins that write files the way the stages do (one JSONL
record per line, a folder per run) and count their calls: what is tested is the runner's bookkeeping, which
is the same for every stage; no model or JAX code is replaced.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs import demo
from motab_jax.errors import MotabInputError
from motab_jax.pipeline import runner
from motab_jax.pipeline.policy_runs import policy_runs
from motab_jax.pipeline.run_lock import LOCK_NAME, RunDirLocked, acquire_run_dir, hold_run_dir
from motab_jax.pipeline.stage_inputs import StageInputsChanged, UnfinishedInput, read_record

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from motab_jax.pipeline.run_lock import acquire_run_dir; acquire_run_dir(sys.argv[1]); "
        "print('held', flush=True); time.sleep(120)")


def _hold_in_another_process(run_dir: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_job_on_a_held_run_dir_fails_at_once_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    holder = _hold_in_another_process(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(RunDirLocked, match=rf"run_dir {tmp_path} is in use by job pid {holder.pid} on host "
                                               rf"{socket.gethostname()}, started .*`kill {holder.pid}`"):
            acquire_run_dir(tmp_path)
        assert time.monotonic() - start < 1.0  # at once, no waiting
        # The job itself: refused before it writes anything into the directory.
        config = demo.get_config()
        config.run_dir, config.stages = str(tmp_path), "models"
        with pytest.raises(RunDirLocked, match=f"pid {holder.pid}"):
            runner.run_pipeline(config)
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, "stages"]
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed job releases nothing itself: the kernel drops its flock
        holder.wait()
    with hold_run_dir(tmp_path) as lock:  # the stale lock is taken over, and names the new holder
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid() == lock.holder["pid"]
    assert "released" in json.loads((tmp_path / LOCK_NAME).read_text())


def test_run_py_refuses_a_held_run_dir_with_one_error_line(tmp_path):
    holder = _hold_in_another_process(tmp_path)
    try:
        result = subprocess.run([sys.executable, "run.py", "--config.stages=models", f"--config.run_dir={tmp_path}"],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    assert f"error: run_dir {tmp_path} is in use by job pid {holder.pid}" in result.stderr
    assert "Traceback" not in result.stderr


def test_where_flock_cannot_see_the_holder_its_heartbeat_decides(tmp_path):
    """On gcsfuse (flock local to one host) a holder on another host is seen only through the lock file."""
    lock_file = tmp_path / LOCK_NAME
    alive = {"pid": 4242, "host": "other-host", "started": "2025-01-01T00:00:00", "command": "run.py",
             "heartbeat": time.time() - 30}
    lock_file.write_text(json.dumps(alive))
    with pytest.raises(RunDirLocked, match=r"job pid 4242 on host other-host.*alive 3\d s ago"):
        acquire_run_dir(tmp_path)
    lock_file.write_text(json.dumps(dict(alive, heartbeat=time.time() - 3600)))  # silent for an hour: gone
    acquire_run_dir(tmp_path).release()
    lock_file.write_text(json.dumps(dict(alive, released="2025-01-01T01:00:00")))
    acquire_run_dir(tmp_path).release()


# --------------------------------------------------------------------------------------- stand-in stages
RECORDS = 3


class _Stages:
    """Stand-ins for the synthesize and sft stages: synthesis appends RECORDS records per run (one per call until
    `stop_after` records, then it dies, as a killed job would); sft writes sft_<run>/done.json."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.stop_after: int | None = None
        monkeypatch.setitem(runner.STAGES, "synthesize", self.synthesize)
        monkeypatch.setitem(runner.STAGES, "sft", self.sft)
        monkeypatch.setitem(runner.STAGES, "eval", self.eval)

    def synthesize(self, config, run_dir: Path, mesh):
        self.calls.append("synthesize")
        summary = {}
        for run in policy_runs(config):
            path = run_dir / f"synthesis_{run.stem}.jsonl"
            have = len(path.read_text().splitlines()) if path.exists() else 0
            with open(path, "a") as f:
                for i in range(have, RECORDS):
                    if self.stop_after is not None and i >= self.stop_after:
                        raise KeyboardInterrupt
                    f.write(json.dumps({"id": i, "eps0": config.synthesis.eps0}) + "\n")
            summary[run.label] = {"records": RECORDS}
        return summary

    def eval(self, config, run_dir: Path, mesh):
        self.calls.append("eval")
        (run_dir / "eval").mkdir(exist_ok=True)
        return {"models": sorted(p.name for p in run_dir.glob("sft_*"))}

    def sft(self, config, run_dir: Path, mesh):
        self.calls.append("sft")
        for run in policy_runs(config):
            (run_dir / f"sft_{run.stem}").mkdir(exist_ok=True)
            (run_dir / f"sft_{run.stem}" / "done.json").write_text(json.dumps({"lr": config.sft.learning_rate}))
        return {"steps": 1}


def _config(run_dir: Path, **changes):
    config = demo.get_config()
    config.run_dir, config.stages, config.policies = str(run_dir), "synthesize,sft", "motab"
    for key, value in changes.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


def test_a_changed_setting_is_refused_naming_the_fields_and_redo_remakes_the_stage_and_later_ones(tmp_path,
                                                                                                monkeypatch):
    stages = _Stages(monkeypatch)
    runner.run_pipeline(_config(tmp_path))
    assert stages.calls == ["synthesize", "sft"]
    records = (tmp_path / "synthesis_motab.jsonl").read_text()
    # The same command again: both skipped. Execution settings (mesh, slots, accumulation) may change.
    runner.run_pipeline(_config(tmp_path, **{"synthesis.num_slots": 4, "sft.micro_batches": 2, "mesh.data": 4,
                                             "mesh.fsdp": 2}))
    assert stages.calls == ["synthesize", "sft"]
    config_json = (tmp_path / "config.json").read_text()
    # A changed result setting: refused before anything is touched, each stage with what changed.
    with pytest.raises(StageInputsChanged) as refused:
        runner.run_pipeline(_config(tmp_path, **{"synthesis.eps0": 0.3, "sft.epochs": 2}))
    message = str(refused.value)
    demo_config = demo.get_config()
    eps0, epochs = demo_config.synthesis.eps0, demo_config.sft.epochs  # the demo's own settings, recorded first
    assert f"stage synthesize (finished; outputs: synthesis_motab.jsonl (3 records)): synthesis.eps0 {eps0} -> 0.3." \
        in message
    assert "To redo it and sft: --config.redo=synthesize" in message
    assert f"stage sft (finished; outputs: sft_motab/): sft.epochs {epochs} -> 2; synthesis.eps0 {eps0} -> 0.3" in message
    assert stages.calls == ["synthesize", "sft"]
    assert (tmp_path / "synthesis_motab.jsonl").read_text() == records
    assert (tmp_path / "config.json").read_text() == config_json  # still the settings of the data held
    # redo=synthesize: synthesis is made again, and sft (made from it) with it.
    changed = _config(tmp_path, **{"synthesis.eps0": 0.3, "sft.epochs": 2, "redo": "synthesize"})
    runner.run_pipeline(changed)
    assert stages.calls == ["synthesize", "sft"] * 2
    assert {json.loads(line)["eps0"] for line in (tmp_path / "synthesis_motab.jsonl").read_text().splitlines()} == {0.3}
    assert json.loads((tmp_path / "config.json").read_text())["synthesis"]["eps0"] == 0.3
    assert read_record(tmp_path, "sft").inputs["synthesis.eps0"] == 0.3
    # Rerunning that same command (redo still given) keeps the work: its inputs are unchanged now.
    runner.run_pipeline(changed)
    assert stages.calls == ["synthesize", "sft"] * 2


def test_a_stage_refuses_unfinished_inputs_and_says_what_exists(tmp_path, monkeypatch):
    stages = _Stages(monkeypatch)
    stages.stop_after = 2
    with pytest.raises(KeyboardInterrupt):  # killed mid-synthesis: 2 of 3 records written
        runner.run_pipeline(_config(tmp_path))
    with pytest.raises(UnfinishedInput, match=r"stage sft reads the outputs of stage synthesize, which has not "
                                              r"finished in .*found: synthesis_motab.jsonl \(2 records\)\): add "
                                              r"synthesize before sft in stages"):
        runner.run_pipeline(_config(tmp_path, stages="sft"))
    assert stages.calls == ["synthesize"]
    with pytest.raises(UnfinishedInput, match="which has not run"):
        runner.run_pipeline(_config(tmp_path / "fresh", stages="sft"))
    # The sft stage itself reads only a synthesis file that finished whole.
    from motab_jax.pipeline.stages import _finished_synthesis

    (run,) = policy_runs(_config(tmp_path))
    with pytest.raises(UnfinishedInput, match=r"synthesis_motab.jsonl \(2 records so far\), but synthesis of 'motab' "
                                              r"has not finished"):
        _finished_synthesis(tmp_path, run)
    stages.stop_after = None
    runner.run_pipeline(_config(tmp_path))  # finishes the synthesis, then sft
    assert stages.calls == ["synthesize", "synthesize", "sft"]
    with open(tmp_path / "synthesis_motab.jsonl", "a") as f:
        f.write(json.dumps({"id": 99}) + "\n")
    with pytest.raises(UnfinishedInput, match="holds 4 records, but synthesis of 'motab' finished with 3"):
        _finished_synthesis(tmp_path, run)


def test_amend_continues_a_training_stage_in_progress_with_new_optimizer_settings_only(tmp_path, monkeypatch):
    stages = _Stages(monkeypatch)

    def dies(config, run_dir, mesh):  # an sft that stopped (e.g. on a NaN) after writing a checkpoint
        (run_dir / "sft_motab").mkdir(exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setitem(runner.STAGES, "sft", dies)
    with pytest.raises(KeyboardInterrupt):
        runner.run_pipeline(_config(tmp_path))
    monkeypatch.setitem(runner.STAGES, "sft", stages.sft)
    lower = {"sft.learning_rate": 1e-4}
    with pytest.raises(StageInputsChanged, match=r"stage sft \(started, not finished.*sft\.learning_rate 0\.0003 -> "
                                                 r"0\.0001.*--config\.amend=sft \(continue from its last good"):
        runner.run_pipeline(_config(tmp_path, **lower))
    with pytest.raises(StageInputsChanged, match="amend continues only a training stage in progress whose optimizer"):
        runner.run_pipeline(_config(tmp_path, **{"sft.epochs": 2, "amend": "sft"}))
    runner.run_pipeline(_config(tmp_path, **lower, amend="sft"))
    assert stages.calls == ["synthesize", "sft"]
    record = read_record(tmp_path, "sft")
    assert record.inputs["sft.learning_rate"] == 1e-4
    assert record.amended[0]["changes"] == {"sft.learning_rate": [3e-4, 1e-4]}
    with pytest.raises(MotabInputError, match=r"redo='synth': unknown stage\(s\) 'synth'; accepted: all, models"):
        runner.run_pipeline(_config(tmp_path, redo="synth"))


def test_a_stage_finished_before_an_earlier_stage_ran_is_refused_and_old_directories_are_adopted(tmp_path,
                                                                                                 monkeypatch):
    stages = _Stages(monkeypatch)
    runner.run_pipeline(_config(tmp_path, stages="eval"))  # the base models only
    # eval would be skipped as finished, and the fine-tuned student never evaluated: refused instead.
    with pytest.raises(StageInputsChanged, match=r"stage eval \(finished; outputs: eval/\): it ran before stage\(s\) "
                                                 r"synthesize, sft, which this job runs now\. To redo it: "
                                                 r"--config.redo=eval"):
        runner.run_pipeline(_config(tmp_path, stages="synthesize,sft,eval"))
    summaries = runner.run_pipeline(_config(tmp_path, stages="synthesize,sft,eval", redo="eval"))
    assert stages.calls == ["eval", "synthesize", "sft", "eval"] and summaries["eval"]["models"] == ["sft_motab"]
    # A directory from before stage records (done markers only): its stages take the job's settings.
    for record in (tmp_path / "stages").glob("*.inputs.json"):
        record.unlink()
    runner.run_pipeline(_config(tmp_path, stages="synthesize,sft,eval"))
    assert stages.calls == ["eval", "synthesize", "sft", "eval"]
    assert read_record(tmp_path, "sft").covers == ["synthesize", "sft"]
    with pytest.raises(StageInputsChanged, match=rf"synthesis\.eps0 {demo.get_config().synthesis.eps0} -> 0\.5"):
        runner.run_pipeline(_config(tmp_path, **{"synthesis.eps0": 0.5}))


def test_a_full_disk_while_writing_records_is_one_clear_error_and_the_written_records_stay(tmp_path, monkeypatch):
    """A real write failure from the kernel: RLIMIT_FSIZE makes a write past the limit fail (EFBIG), as a full disk
    does (ENOSPC); the records go through the project's writer (motab_jax.jsonl.append_records)."""
    import resource

    from motab_jax.errors import EnvironmentProblem
    from motab_jax.jsonl import append_records, read_records

    text = "x" * 4000

    def synthesize(config, run_dir, mesh):  # appends 4 KB records, resuming after the ones already written
        path = run_dir / "synthesis_motab.jsonl"
        have = read_records(path, ["id"])
        for _ in append_records(path, ({"id": i, "text": text} for i in range(5) if (i,) not in have)):
            pass
        return {"motab": {"records": 5}}

    monkeypatch.setitem(runner.STAGES, "synthesize", synthesize)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal's default kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, hard))  # room for 2 records and a half
    try:
        with pytest.raises(EnvironmentProblem, match=r"appending a record to .*synthesis_motab.jsonl: a file would "
                                                     r"exceed the file-size limit.*rerun the same command"):
            runner.run_pipeline(_config(tmp_path, stages="synthesize"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    path = tmp_path / "synthesis_motab.jsonl"
    assert path.stat().st_size == 10_000  # 2 whole records and the torn start of the third
    assert sorted(read_records(path, ["id"])) == [(0,), (1,)]  # intact; the torn line is cut off
    runner.run_pipeline(_config(tmp_path, stages="synthesize"))  # space again: the same command finishes
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 4]
