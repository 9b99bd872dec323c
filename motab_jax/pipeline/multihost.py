"""Synthesis and evaluation across hosts (JAX multi-controller: one process per host, `jax.distributed`).

`distributed.generation_mode` (configs/base.py holds the default) says how the generation stages use the hosts:

- "data_parallel": every process runs its own engine on its own devices (a mesh of its local devices, with the
  run's `mesh.fsdp` x `mesh.tensor` model-parallel group and the rest as engine groups) over a deterministic
  shard of the work: trajectory / sample n = question position x samples + sample index belongs to process
  n % process_count. Each process appends to its own shard file (`jsonl.shard_path`), resumable as a one-host
  run; a host that finishes early waits at a barrier (`wait_for_all`); then process 0 merges the shards into
  the stage's single output, in canonical order (`jsonl.merge_shards`). Random keys come from (seed, question
  position, sample index), so the merged records are a one-host run's. No device collective runs during
  generation: the only traffic is the barrier and the shared file system.
- "global_mesh": one engine over a mesh spanning the hosts (a model that needs several hosts' memory), for the
  synthesize stage (either engine: one vocabulary, or text-level scoring) and the eval stage. Every process runs
  the same host loop on the same values (`motab.driver`: inputs assembled from each process's identical copy,
  outputs gathered to every process), so every scheduler decision is the same everywhere; process 0 appends the
  records. The others append theirs to a private copy of the output taken before the engine starts
  (`private_output`): every process skips the same finished pairs on resume, since process 0 cannot write before
  the others joined the engine's first collective. Evaluation likewise (each process grades the samples, process 0
  writes them and the summary). Each decode step's tensor-parallel all-reduces cross hosts. The text-level
  (cross-vocabulary) engine runs the same way (`motab.cross_engine`: its host-side incremental encoders run in
  every process on the gathered tokens). The private copies are removed at the end of the stage
  (`drop_private_outputs`).
- "auto": data_parallel when the model-parallel group (mesh.fsdp x mesh.tensor devices, which holds one copy of
  each model) fits inside one host's devices, global_mesh otherwise.

Every process must see one run directory (`check_shared_run_dir`): the shards, the merged files and the stage
markers are files there.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from motab_jax.errors import EnvironmentProblem
from motab_jax.models.sharding import MeshConfig, make_mesh

log = logging.getLogger("motab_jax")

GENERATION_MODES = ("auto", "data_parallel", "global_mesh")
GENERATION_STAGES = ("synthesize", "eval")
# How long a process that finished its shard waits for the others (the slowest host's shard can take hours).
BARRIER_TIMEOUT_S = 7 * 24 * 3600


@dataclasses.dataclass(frozen=True)
class GenerationPlan:
    """How the generation stages of this job use its processes."""

    mode: str  # "one_process", "data_parallel" or "global_mesh"
    why: str  # the arithmetic behind the choice (logged, and quoted by validation)
    shard: tuple[int, int] = (0, 1)  # (this process's index, count) in the work queue's split
    local_mesh: tuple[int, int, int] | None = None  # data, fsdp, tensor of each host's mesh (data_parallel)


def plan_generation(mode: str, mesh: MeshConfig, *, process_index: int, process_count: int, device_count: int,
                    local_device_count: int) -> GenerationPlan:
    """The plan for `mode` (one of GENERATION_MODES) with the run's `mesh` over `device_count` devices, of which
    `local_device_count` are this process's. Raises ValueError naming the field and the arithmetic when `mode`
    cannot run with this mesh."""
    if mode not in GENERATION_MODES:
        raise ValueError(f"distributed.generation_mode={mode!r}: accepted {', '.join(GENERATION_MODES)}")
    if process_count == 1:
        return GenerationPlan("one_process", "one process")
    data, fsdp, tensor = mesh.shape(device_count)
    group = fsdp * tensor
    fits = local_device_count % group == 0
    arithmetic = (f"one copy of the models spans mesh.fsdp={fsdp} x mesh.tensor={tensor} = {group} device(s); a host "
                  f"has {local_device_count} ({process_count} processes, {device_count} devices)")
    if mode == "auto":
        mode = "data_parallel" if fits else "global_mesh"
        arithmetic += (f": {group} divides {local_device_count}, so each host runs its own engine" if fits else
                       f": {group} does not divide {local_device_count}, so the engine spans hosts")
    if mode == "data_parallel":
        if not fits:
            raise ValueError(f"distributed.generation_mode='data_parallel' runs one engine per host, but {arithmetic}: "
                             f"set mesh.fsdp x mesh.tensor to a divisor of {local_device_count} (e.g. mesh.tensor="
                             f"{local_device_count}, mesh.fsdp=1), or generation_mode='global_mesh'")
        local = (local_device_count // group, fsdp, tensor)
        why = (f"{arithmetic}; each of the {process_count} processes runs {local[0]} engine group(s) on a local mesh "
               f"data={local[0]} x fsdp={fsdp} x tensor={tensor} over 1/{process_count} of the work")
        return GenerationPlan("data_parallel", why, (process_index, process_count), local)
    return GenerationPlan("global_mesh", f"{arithmetic}; one engine over the global mesh data={data} x fsdp={fsdp} x "
                                         f"tensor={tensor}")


def generation_plan(config: Any) -> GenerationPlan:
    """`plan_generation` for this job's config and processes."""
    return plan_generation(str(config.distributed.generation_mode), MeshConfig(**config.mesh),
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           device_count=jax.device_count(), local_device_count=jax.local_device_count())


def generation_problems(config: Any, stages: list[str], process_count: int) -> list[str]:
    """Why the generation stages of `stages` cannot run across `process_count` processes (empty when they can)."""
    if process_count == 1 or not set(GENERATION_STAGES) & set(stages):
        return []
    try:
        MeshConfig(**config.mesh).shape(jax.device_count())
    except (ValueError, TypeError):
        return []  # validation reports the mesh itself
    try:  # devices split evenly over the processes, as jax.distributed does
        plan_generation(str(config.distributed.generation_mode), MeshConfig(**config.mesh), process_index=0,
                        process_count=process_count, device_count=jax.device_count(),
                        local_device_count=jax.device_count() // process_count)
    except ValueError as e:
        return [str(e)]
    return []


def private_path(path: Path) -> Path:
    """This process's private copy of `path` (`private_output`)."""
    return path.parent / ".global_mesh" / f"process{jax.process_index()}" / path.name


def private_output(path: Path) -> Path:
    """Where a process other than 0 writes what goes to `path` (a file or a folder) in global_mesh mode: a copy of
    `path` as it is now (what resume skips is then the same in every process), private to this process. Process 0
    writes `path` itself."""
    if is_primary():
        return path
    private = private_path(path)
    shutil.rmtree(private, ignore_errors=True)
    private.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        shutil.copytree(path, private)
    else:
        private.write_bytes(path.read_bytes() if path.exists() else b"")
    return private


def drop_private_outputs(run_dir: Path) -> None:
    """Remove this process's private copies (`private_output`) under `run_dir` (nothing on process 0), and their
    `.global_mesh` folder once no other process's copy is left in it (the last process to finish removes it)."""
    if not is_primary():
        for folder in list(Path(run_dir).glob(f"**/.global_mesh/process{jax.process_index()}")):
            shutil.rmtree(folder, ignore_errors=True)
            try:
                folder.parent.rmdir()
            except OSError:  # another process's copy is still there: that process removes the folder
                pass


def generation_mesh(config: Any, mesh: Mesh) -> Mesh:
    """The mesh the generation stages place their models on: in data_parallel mode a mesh of this process's own
    devices (`GenerationPlan.local_mesh`), else `mesh` (the job's)."""
    plan = generation_plan(config)
    if plan.mode != "data_parallel":
        return mesh
    data, fsdp, tensor = plan.local_mesh
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), devices=jax.local_devices())


def is_primary() -> bool:
    """Process 0: the one that writes the stage's merged outputs and markers."""
    return jax.process_index() == 0


_barrier_count = itertools.count()
_FAILED = "motab/failed/"  # process index -> why it stopped (`report_failure`)


class OtherProcessFailed(EnvironmentProblem):
    """Another process of the job stopped (an error, a signal) while this one waited for it: run.py prints one
    line, and the failing process's own error is in its output and its run log."""


def _client() -> Any:
    from jax._src import distributed  # the client of jax.distributed.initialize: its key-value store

    return distributed.global_state.client


def report_failure(error: BaseException) -> None:
    """Tell the other processes that this one stops (`wait_for_all` raises there at once, instead of waiting until
    the coordination service gives up on this process)."""
    client = _client() if jax.process_count() > 1 else None
    if client is not None:
        try:
            client.key_value_set(f"{_FAILED}{jax.process_index()}", f"{type(error).__name__}: {error}"[:2000])
        except Exception:  # noqa: BLE001 - the coordination service is gone too: nothing left to tell
            pass


def wait_for_all(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Block until every process reaches this point (nothing with one process); raise `OtherProcessFailed` when
    another process stopped with an error (`report_failure`).

    Through the coordination service's key-value store, not a device collective: a host that finished its shard
    early can wait for hours without a collective timing out, and no accelerator is busy meanwhile. Every process
    must call the same barriers in the same order (their ids are numbered)."""
    if jax.process_count() == 1:
        return
    client = _client()
    if client is None:  # initialised some other way: a device collective
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    tag = f"motab/barrier/{next(_barrier_count)}/"
    client.key_value_set(f"{tag}{jax.process_index()}", name)
    deadline, pause = time.monotonic() + timeout_s, 0.01
    while len(client.key_value_dir_get(tag)) < jax.process_count():
        failed = client.key_value_dir_get(_FAILED)
        if failed:
            who, why = failed[0]
            raise OtherProcessFailed(f"process {who.rsplit('/', 1)[-1]} of {jax.process_count()} stopped ({why}) while "
                                     f"process {jax.process_index()} waited at '{name}'; finished work is kept: rerun "
                                     "the same command on every host to continue")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s at '{name}' for {jax.process_count()} processes; only "
                               f"{len(client.key_value_dir_get(tag))} arrived")
        time.sleep(pause)
        pause = min(2 * pause, 1.0)


def all_gather(name: str, value: Any) -> list[Any]:
    """Every process's `value` (JSON), in process order, through the key-value store (a barrier as well)."""
    if jax.process_count() == 1:
        return [value]
    tag = f"motab/gather/{next(_barrier_count)}/"
    _client().key_value_set(f"{tag}{jax.process_index():06d}", json.dumps(value))
    wait_for_all(name)
    return [json.loads(v) for _, v in sorted(_client().key_value_dir_get(tag))]


def check_shared_run_dir(run_dir: Path) -> None:
    """Raise `EnvironmentProblem` unless every process sees the files process 0 writes into `run_dir`."""
    if jax.process_count() == 1:
        return
    probe = Path(run_dir) / "stages" / f".shared-{random.getrandbits(32):08x}"
    if is_primary():
        probe.write_text("written by process 0 to check that every host sees this run directory\n")
    probe = probe.with_name(all_gather("run_dir probe written", probe.name)[0])  # process 0's, in this run_dir
    seen = all_gather("run_dir probe read", probe.exists())
    if is_primary():
        probe.unlink(missing_ok=True)
    if not all(seen):
        blind = [i for i, ok in enumerate(seen) if not ok]
        raise EnvironmentProblem(
            f"run_dir={str(run_dir)!r}: process(es) {blind} of {len(seen)} do not see the files process 0 writes there; "
            "a multi-host job needs one run directory shared by every host (NFS, Filestore, Lustre, gcsfuse): give a "
            "run_dir on a file system every host mounts at the same path")
