"""Device mesh and the logical-axis -> mesh-axis rules used by loading, training and sampling.

Every array in the package names its dimensions with logical axes ("vocab", "embed", "heads", ...).
One short table maps those to mesh axes; a dimension whose size the mesh axes do not divide is
replicated instead (e.g. 2 KV heads on a 4-way tensor axis), so one rule set serves every model size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
LogicalAxes = tuple[str | None, ...]
Rules = Mapping[str, str | tuple[str, ...] | None]  # logical axis -> mesh axis or axes

# Logical axis -> mesh axis (or axes). Parameters are sharded over fsdp on the embedding dimension
# (ZeRO-3 style) and over tensor on heads / mlp / vocab (Megatron style); batches over data and fsdp.
DEFAULT_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "cache_length": None,
    # Paged cache pools: one pool shared by the batch, split over KV heads (tensor) only.
    "cache_pages": None,
    "page": None,
    "layers": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    # Mixture of experts: experts over fsdp (expert parallelism, `models.moe`), each expert's units over tensor.
    # In an expert weight the experts axis comes before embed, so it takes fsdp and embed stays whole.
    "experts": "fsdp",
    "mlp_gate_up": "tensor",
}


# The rules of stages that decode (synthesis, evaluation, rollouts). Within a group of devices (fsdp x tensor)
# every weight is split along its heads / mlp / vocabulary dimension (tensor parallelism), never along the
# embedding dimension that most matmuls contract over, so a decode step or a k+1 chunk needs no weight all-gather.
# Over `data` the weights are replicated and the engine's slots and KV page pools are split: each data index is
# an engine group with its own slots and its own pool (`motab.driver`), so no KV page is stored twice.
_MODEL_PARALLEL = ("tensor", "fsdp")
SAMPLING_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    **DEFAULT_RULES, "batch": "data", "cache_pages": "data", "embed": None, "vocab": _MODEL_PARALLEL,
    "heads": _MODEL_PARALLEL, "kv_heads": _MODEL_PARALLEL, "mlp": _MODEL_PARALLEL,
    # Experts over the whole group (what the expert count divides; the units take what is left).
    "experts": _MODEL_PARALLEL, "mlp_gate_up": _MODEL_PARALLEL}


def data_groups(mesh: Mesh | None) -> int:
    """Engine groups a decoding stage runs on `mesh`: its `data` axis size (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape.get("data", 1))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. -1 on one axis means "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh sizes must be positive or -1, got data={self.data} fsdp={self.fsdp} "
                             f"tensor={self.tensor}")
        if sizes.count(-1) > 1:
            raise ValueError("at most one mesh axis may be -1 (use all remaining devices)")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices cannot be split into data/fsdp/tensor with fixed "
                                 f"sizes multiplying to {known}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
                             f"devices, but {num_devices} are available; set one axis to -1 or match the count")
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices of all processes)."""
    config = config or MeshConfig()
    devices = list(devices) if devices is not None else jax.devices()
    shape = config.shape(len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Multi-host start: call before any other JAX work on every host (no-op for one process).

    On TPU pods and SLURM/GPU clusters JAX discovers all three values itself; pass them explicitly
    elsewhere (e.g. two processes on localhost for testing).
    """
    if num_processes == 1:
        return
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    log.info("jax.distributed: process %d of %d, %d global devices", jax.process_index(),
             jax.process_count(), jax.device_count())


def logical_to_spec(axes: LogicalAxes, shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                    rules: Mapping[str, str | tuple[str, ...] | None] = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for logical `axes`; with `shape` and `mesh`, a dim is split only over mesh axes that divide it."""
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for i, name in enumerate(axes):
        target = rules.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        # A mesh axis may appear once per spec; size-1 axes are dropped to keep specs readable.
        mesh_axes = tuple(a for a in mesh_axes if a not in used and (mesh is None or mesh.shape[a] > 1))
        if mesh is not None and shape is not None:
            # Keep the longest prefix of the mesh axes that divides the dimension.
            while mesh_axes and shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
                mesh_axes = mesh_axes[:-1]
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, axes: LogicalAxes, shape: Sequence[int],
                     rules: Mapping[str, str | tuple[str, ...] | None] = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def shard_array(x: jax.Array | np.ndarray, mesh: Mesh, axes: LogicalAxes,
                rules: Mapping[str, str | tuple[str, ...] | None] = DEFAULT_RULES) -> jax.Array:
    """Place one array on `mesh` according to its logical axes."""
    return jax.device_put(x, logical_sharding(mesh, axes, x.shape, rules))
