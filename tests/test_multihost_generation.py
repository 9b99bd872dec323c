"""Synthesis and evaluation across processes (`motab_jax.pipeline.multihost`: data-parallel engines, or one engine
over a global mesh).

Fast: the modes' arithmetic, how the work queue is split, the merge of shard files, the private copies of one engine
over several processes. Slow: `run.py` as two localhost processes (4 CPU devices each, gloo collectives, as
tests/test_multihost.py) against a one-process run of the same job: data-parallel, the same records and samples byte
for byte, also after both processes were killed mid-synthesis and relaunched; one engine over both processes (the
token engine, also killed and relaunched, and the text-level engine of a teacher with another tokenizer), the same
records to float32 rounding of the scores.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs import demo
from motab_jax.jsonl import append_records, merge_shards, read_jsonl, shard_files, shard_path
from motab_jax.models.sharding import MeshConfig
from motab_jax.pipeline.multihost import plan_generation
from motab_jax.pipeline.validation import multihost_problems

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ fast
def _plan(mode: str = "auto", processes: int = 2, index: int = 1, local: int = 4, **mesh):
    return plan_generation(mode, MeshConfig(**mesh), process_index=index, process_count=processes,
                           device_count=processes * local, local_device_count=local)


def test_generation_mode_follows_the_model_parallel_group():
    assert _plan(processes=1, index=0).mode == "one_process"
    plan = _plan()  # mesh data=-1: one device per copy of the models, 4 engine groups per host
    assert (plan.mode, plan.shard, plan.local_mesh) == ("data_parallel", (1, 2), (4, 1, 1))
    assert _plan("data_parallel", data=2, tensor=4).local_mesh == (1, 1, 4)  # each host holds one whole copy
    assert _plan(fsdp=2, tensor=2, processes=4, index=3).local_mesh == (1, 2, 2)
    wide = _plan(tensor=8)  # a copy over 8 devices: more than a host's 4
    assert wide.mode == "global_mesh" and "8 does not divide 4" in wide.why
    with pytest.raises(ValueError, match=r"mesh\.fsdp=1 x mesh\.tensor=8 = 8 device\(s\); a host has 4 .*"
                                         r"set mesh\.fsdp x mesh\.tensor to a divisor of 4"):
        _plan("data_parallel", tensor=8)
    with pytest.raises(ValueError, match=r"generation_mode='pipeline': accepted auto, data_parallel, global_mesh"):
        _plan("pipeline")


def test_generation_mode_is_validated():
    config = demo.get_config()
    config.distributed.generation_mode = "pipeline"
    assert multihost_problems(config, ["synthesize"], 1) == [
        "distributed.generation_mode='pipeline': accepted auto, data_parallel, global_mesh"]


def test_one_engine_over_hosts_runs_either_scoring_and_data_parallel_still_needs_a_host_sized_copy():
    """A copy of the models over 8 devices of 2 hosts x 4: global_mesh (auto or named) runs synthesis with token-level
    or text-level scoring (the cross-vocabulary engine) and eval; data_parallel is refused with the arithmetic."""
    config = demo.get_config()
    config.mesh.data, config.mesh.tensor = 1, 8
    for scoring in ("auto", "text"):
        config.synthesis.scoring = scoring
        for mode in ("auto", "global_mesh"):
            config.distributed.generation_mode = mode
            assert multihost_problems(config, ["synthesize", "eval"], 2) == []
            assert _plan(mode, data=1, tensor=8).mode == "global_mesh"
    config.distributed.generation_mode = "data_parallel"
    (problem,) = multihost_problems(config, ["synthesize"], 2)
    assert "= 8 device(s); a host has 4" in problem and "set mesh.fsdp x mesh.tensor to a divisor of 4" in problem


def test_private_copies_and_their_folder_are_removed_by_the_last_process(tmp_path, monkeypatch):
    """global_mesh: processes 1 and 2 each keep a private copy of a file and of a folder; once both dropped theirs, no
    `.global_mesh` folder is left (the first to finish leaves the folder to the other)."""
    import jax

    from motab_jax.pipeline import multihost

    records, samples = tmp_path / "synthesis_motab.jsonl", tmp_path / "eval" / "teacher"
    records.write_text('{"id": "q0", "sample_index": 0}\n')
    samples.mkdir(parents=True)
    (samples / "held_out.samples.jsonl").write_text("{}\n")
    copies = {}
    for index in (1, 2):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        copies[index] = (multihost.private_output(records), multihost.private_output(samples))
        assert copies[index][0].read_text() == records.read_text()
        assert (copies[index][1] / "held_out.samples.jsonl").read_text() == "{}\n"
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert multihost.private_output(records) == records  # process 0 writes the output itself
    for index in (2, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        multihost.drop_private_outputs(tmp_path)
        left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("**/.global_mesh*"))
        assert left == ([] if index == 1 else [".global_mesh", "eval/.global_mesh"])
    assert records.exists() and (samples / "held_out.samples.jsonl").exists()


def test_shards_split_the_trajectories_once_with_global_positions():
    """Every (question, sample) pair is in exactly one process's queue, under its one-process position (its key)."""
    from motab_jax.motab.config import resolve_config
    from motab_jax.motab.synthesize import _pending, parse_questions
    from motab_jax.text import byte_level_tokenizer

    items = parse_questions([{"id": f"q{i}", "problem": f"{i} + {i}?"} for i in range(7)])
    cfg = resolve_config({"samples_per_question": 3, "output_path": ""})
    tokenizer = byte_level_tokenizer()
    whole, _ = _pending(items, tokenizer, cfg)
    for count in (2, 3, 5):
        queues = [_pending(items, tokenizer, cfg, (index, count))[0] for index in range(count)]
        assert sorted(pair for queue in queues for pair in queue) == sorted(whole)
        assert max(len(q) for q in queues) - min(len(q) for q in queues) <= 1  # uneven by at most one


def test_merge_of_shards_is_canonical_whatever_the_split(tmp_path):
    """Shards written in any finishing order, one of them torn by a kill, a pair redone by another process: the
    merged file is the canonical one, and the shards are gone."""
    position = {f"q{i}": i for i in range(6)}
    records = [{"id": q, "sample_index": r, "text": f"{q}/{r}"} for q in position for r in range(2)]
    canonical = sorted(records, key=lambda x: (position[x["id"]], x["sample_index"]))
    order = lambda x: (position[x["id"]], x["sample_index"])  # noqa: E731
    rng = random.Random(0)
    merged = {}
    for count in (1, 2, 3):
        path = tmp_path / f"split{count}" / "synthesis_motab.jsonl"
        for index in range(count):
            mine = [x for n, x in enumerate(records) if n % count == index]
            rng.shuffle(mine)
            list(append_records(shard_path(path, index, count), mine))
        if count == 3:
            list(append_records(shard_path(path, 0, 3), [records[1]]))  # redone by process 0: one copy is kept
            with open(shard_path(path, 2, 3), "a") as f:
                f.write('{"id": "q9", "sampl')  # a killed writer's last line
        # Another run's files in the folder are not shards of this one.
        (path.parent / "synthesis_motab_no_stitch.part-0-of-2.jsonl").write_text('{"id": "x", "sample_index": 0}\n')
        (path.parent / "synthesis_motab.jsonl.part-0-of-2").write_text("not a shard\n")
        assert len(shard_files(path)) == (0 if count == 1 else count)
        merge_shards(path, ("id", "sample_index"), order)
        merged[count] = path.read_bytes()
        assert read_jsonl(path) == canonical and shard_files(path) == []
    assert merged[1] == merged[2] == merged[3]


# ------------------------------------------------------------------------------------------------ slow
# A small job: random-initialised demo models, MOTAB sampled (temperature 0.6) and teacher-only greedy, evaluation
# greedy on the demo's held-out problems.
JOB = {"stages": "synthesize,eval", "policies": "motab,teacher_only@teacher_temperature=0", "data.demo_train": 8,
       "data.demo_held_out": 6, "synthesis.samples_per_question": 2, "synthesis.traj_cap": 24,
       "synthesis.num_slots": 4, "synthesis.iterations_per_sync": 4, "eval.max_new_tokens": 16, "eval.batch_size": 4}
OUTPUTS = ("synthesis_motab.jsonl", "synthesis_teacher_only_teacher_temperature0.jsonl",
           "eval/teacher/held_out.samples.jsonl", "eval/student_before/held_out.samples.jsonl",
           "eval/teacher/summary.json", "eval/student_before/summary.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _commands(run: Path, processes: int, job: dict | None = None, config: Path | None = None
              ) -> list[tuple[list[str], dict[str, str]]]:
    """run.py for each process of a job (default `JOB`, on the config file `config`, default the demo's) over 8 CPU
    devices in all."""
    base = [sys.executable, "run.py"] + ([f"--config={config}"] if config else []) + [f"--config.run_dir={run}"] + [
        f"--config.{k}={v}" for k, v in (job or JOB).items()]
    port = _free_port()
    out = []
    for i in range(processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}")
        extra = [] if processes == 1 else [f"--config.distributed.num_processes={processes}",
                                           f"--config.distributed.coordinator_address=localhost:{port}",
                                           f"--config.distributed.process_id={i}"]
        out.append((base + extra, env))
    return out


def _start(run: Path, processes: int, job: dict | None = None, config: Path | None = None) -> list[subprocess.Popen]:
    return [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for command, env in _commands(run, processes, job, config)]


def _finish(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-4000:]


def _run(run: Path, processes: int, job: dict | None = None, config: Path | None = None) -> float:
    start = time.monotonic()
    _finish(_start(run, processes, job, config))
    return time.monotonic() - start


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, float]:
    run = tmp_path_factory.mktemp("one") / "run"
    return run, _run(run, 1)


def _assert_same_outputs(run: Path, reference: Path) -> None:
    for name in OUTPUTS:
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    assert not list(run.glob("**/*.part-*-of-*.jsonl"))
    keys = [(r["id"], r["sample_index"]) for r in read_jsonl(run / "synthesis_motab.jsonl")]
    assert len(keys) == len(set(keys)) == 16
    assert (run / "results.md").read_text().split("## Stages")[0] == \
        (reference / "results.md").read_text().split("## Stages")[0]


@pytest.mark.slow
def test_two_processes_synthesize_and_evaluate_as_one(one_process, tmp_path):
    reference, one_seconds = one_process
    run = tmp_path / "run"
    two_seconds = _run(run, 2)
    _assert_same_outputs(run, reference)
    log = (run / "run.log").read_text()
    assert "synthesize / eval: data_parallel" in log and "local mesh data=4 x fsdp=1 x tensor=1" in log
    assert (run / "run.process1.log").exists()
    print(f"\nwall time, cold compilation cache: one process (8 devices) {one_seconds:.0f} s, two processes "
          f"(4 + 4 devices) {two_seconds:.0f} s: ratio {two_seconds / one_seconds:.2f}")


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _kill_all_when(procs: list[subprocess.Popen], condition) -> None:
    """SIGKILL every process of a running job as soon as `condition()` holds (within 10 minutes); the job must not
    end on its own before."""
    deadline = time.monotonic() + 600
    while not condition() and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "the job ended before it could be killed"
        time.sleep(0.02)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    for proc in procs:
        proc.communicate()


@pytest.mark.slow
def test_killed_two_process_job_resumes_to_the_same_outputs(one_process, tmp_path):
    """Both processes SIGKILLed once their MOTAB shards hold records, then relaunched: the merged outputs equal
    the one-process run's, with every trajectory once."""
    reference, _ = one_process
    run = tmp_path / "run"
    shards = [shard_path(run / "synthesis_motab.jsonl", i, 2) for i in range(2)]
    _kill_all_when(_start(run, 2), lambda: all(_lines(s) >= 1 for s in shards))
    written = sum(_lines(s) for s in shards)
    assert 2 <= written < 16 and not (run / "synthesis_motab.jsonl").exists()
    assert not (run / "stages" / "synthesize.done").exists()
    _finish(_start(run, 2))
    _assert_same_outputs(run, reference)
    summary = json.loads((run / "stages" / "synthesize.done").read_text())
    assert summary["motab"]["records"] == 16 and summary["motab"]["new_records"] == 16 - written


@pytest.mark.slow
def test_hosts_that_do_not_share_the_run_directory_are_refused(tmp_path):
    """Process 1 is given another run_dir (as a host without the shared mount would see): both processes stop with
    one error line naming the problem, before any stage."""
    procs = []
    for i, ((command, env), run) in enumerate(zip(_commands(tmp_path / "run", 2), ("run", "elsewhere"))):
        command = [c if not c.startswith("--config.run_dir=") else f"--config.run_dir={tmp_path / run}"
                   for c in command]
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err[-3000:]
        assert "process(es) [1] of 2 do not see the files process 0 writes there" in err.splitlines()[-1]
    assert not (tmp_path / "run" / "stages" / "synthesize.inputs.json").exists()


def _approx(value):
    """`value` with every float compared to float32 rounding (a relative 1e-5), everything else exactly."""
    if isinstance(value, float):
        return pytest.approx(value, rel=1e-5, abs=1e-7)
    if isinstance(value, dict):
        return {k: _approx(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_approx(v) for v in value]
    return value


# One copy of the models over all 8 devices (tensor=8): more than a host's 4, so `auto` runs one engine over both
# processes; the MLP and embedding weights are split across them (the demo's 2 KV heads stay whole).
GLOBAL_JOB = dict(JOB, **{"mesh.data": 1, "mesh.tensor": 8, "teacher.path": "", "student.path": ""})


@pytest.fixture(scope="module")
def one_process_global(tmp_path_factory) -> tuple[Path, float]:
    """`GLOBAL_JOB` in one process over the 8 devices: the reference of one engine over two processes."""
    run = tmp_path_factory.mktemp("one_global") / "run"
    return run, _run(run, 1, GLOBAL_JOB)


def _assert_same_records(run: Path, reference: Path, names: tuple[str, ...], trajectories: int) -> None:
    """Every output of `names` equals the reference's: the same tokens, text, steps and decisions, the scores to
    float32 rounding (the all-reduce across processes (gloo) sums in another order than the one inside a process);
    each trajectory once, no shard or private copy left."""
    for name in names:
        if name.endswith(".json"):
            assert json.loads((run / name).read_text()) == _approx(json.loads((reference / name).read_text())), name
            continue
        records, expected = read_jsonl(run / name), read_jsonl(reference / name)
        assert len(records) == len(expected) > 0 and records == _approx(expected), name
    keys = [(r["id"], r["sample_index"]) for r in read_jsonl(run / names[0])]
    assert len(keys) == len(set(keys)) == trajectories
    assert not list(run.glob("**/.global_mesh")) and not list(run.glob("**/*.part-*-of-*.jsonl"))


@pytest.mark.slow
def test_one_engine_over_two_processes_synthesizes_and_evaluates_as_one(one_process_global, tmp_path):
    """generation_mode=auto picks global_mesh; the records (MOTAB sampled, teacher-only greedy) and the evaluation
    (samples, summaries) equal a one-process run over the same mesh shape; only process 0 wrote them."""
    reference, one_seconds = one_process_global
    run = tmp_path / "two"
    two_seconds = _run(run, 2, GLOBAL_JOB)
    _assert_same_records(run, reference, OUTPUTS, 16)
    log = (run / "run.log").read_text()
    assert "synthesize / eval: global_mesh" in log and "8 does not divide 4" in log
    print(f"\nwall time, one engine: one process (8 devices) {one_seconds:.0f} s, two processes (4 + 4 devices, "
          f"tensor-parallel across them) {two_seconds:.0f} s: ratio {two_seconds / one_seconds:.2f}")


@pytest.mark.slow
def test_one_engine_over_two_killed_processes_resumes_to_the_same_outputs(one_process_global, tmp_path):
    """Both processes of one engine SIGKILLed once process 0 appended MOTAB records, then relaunched: every process
    skips the same finished trajectories (process 1 from its new private copy of process 0's file), and the outputs
    equal the uninterrupted one-process run's, with every trajectory once."""
    reference, _ = one_process_global
    run = tmp_path / "run"
    records = run / "synthesis_motab.jsonl"
    _kill_all_when(_start(run, 2, GLOBAL_JOB), lambda: _lines(records) >= 2)
    written = len(read_jsonl(records, torn_tail=True))
    assert 2 <= written < 16 and not (run / "stages" / "synthesize.done").exists()
    _finish(_start(run, 2, GLOBAL_JOB))
    _assert_same_records(run, reference, OUTPUTS, 16)
    summary = json.loads((run / "stages" / "synthesize.done").read_text())
    assert summary["motab"]["records"] == 16 and summary["motab"]["new_records"] == 16 - written


# The cross-vocabulary pair of tests/test_cross_run.py: a teacher with the Qwen3 tokenizer (151,669 ids) judges the
# byte-level student's text (`motab.cross_engine`); a config file, since the teacher's bos_token_id becomes None.
CROSS_CONFIG = """
from configs import demo


def get_config():
    config = demo.get_config()
    config.teacher.tokenizer = "qwen3"
    config.teacher.init.update(dict(vocab_size=151669, eos_token_ids=(151645,), bos_token_id=None,
                                    pad_token_id=151643))
    return config
"""
CROSS_JOB = dict(GLOBAL_JOB, **{"stages": "synthesize", "policies": "motab", "data.demo_train": 6,
                                "synthesis.eps0": 0.5, "synthesis.teacher_min_budget": 32})


@pytest.mark.slow
def test_one_engine_over_two_processes_scores_text_across_vocabularies_as_one(tmp_path):
    """The text-level engine (a teacher with another tokenizer) as one engine over both processes: the records equal
    a one-process run's (the student's and the teacher's tokens, the text, steps and decisions exactly, the scores to
    float32 rounding), and the teacher intervened, writing in its own vocabulary."""
    config = tmp_path / "cross.py"
    config.write_text(CROSS_CONFIG)
    reference, run = tmp_path / "one", tmp_path / "two"
    one_seconds = _run(reference, 1, CROSS_JOB, config)
    two_seconds = _run(run, 2, CROSS_JOB, config)
    _assert_same_records(run, reference, ("synthesis_motab.jsonl",), 12)
    records = read_jsonl(run / "synthesis_motab.jsonl")
    assert any(r["breach_step"] for r in records)
    teacher_segments = [s for r in records for s in r["segments"] if s["source"] == "teacher"]
    assert any(max(s["teacher_token_ids"], default=0) >= 384 for s in teacher_segments)
    log = (run / "run.log").read_text()
    assert "synthesize / eval: global_mesh" in log and "cross-vocabulary synthesis" in log
    print(f"\nwall time, one text-level engine: one process (8 devices) {one_seconds:.0f} s, two processes (4 + 4 "
          f"devices, tensor-parallel across them) {two_seconds:.0f} s: ratio {two_seconds / one_seconds:.2f}")


@pytest.mark.slow
def test_one_engine_over_processes_whose_pools_differ_is_refused(tmp_path):
    """Process 1 sizes its pool otherwise (synthesis.num_pages, as a host with other free memory would): both
    processes stop before the engine runs, with one error line that shows each one's pool and names the knob."""
    procs = []
    for i, (command, env) in enumerate(_commands(tmp_path / "run", 2, dict(GLOBAL_JOB, stages="synthesize"))):
        command = command + (["--config.synthesis.num_pages=999"] if i == 1 else [])
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode != 0, err[-3000:]
        line = next((line for line in err.splitlines() if "their jobs or plans differ" in line), err[-3000:])
        assert "[fingerprint, jobs, pages per group]" in line and ", 999]]" in line, line
        assert "set the pool's size explicitly, synthesis.num_pages" in line, line
    records = tmp_path / "run" / "synthesis_motab.jsonl"
    assert not records.exists() or not records.read_text()
