"""Orbax checkpoints of the whole training job: parameters, optimizer state, step, data-pipeline state and
job metadata, saved every N steps (async) and at the end, keeping the last K.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a crash during a save
leaves the previous checkpoints usable; restoring places every array directly in its target sharding.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("motab_jax")


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding placeholders of a live pytree (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep_last: int = 2,
                 async_save: bool = True):
        if save_every < 1 or keep_last < 1:
            raise ValueError(f"save_every={save_every} and keep_last={keep_last} must be >= 1")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep_last, save_interval_steps=save_every,
                                               enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, train_state: Any, data_state: dict[str, Any], meta: dict[str, Any],
             *, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(train_state), data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        saved = self.manager.save(step, args=args, force=force)
        if saved:
            log.info("checkpoint %d -> %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                                  meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["data"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
