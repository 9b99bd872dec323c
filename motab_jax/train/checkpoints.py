"""Orbax checkpoints of the whole training job: parameters, optimizer state, step, data-pipeline state and
job metadata, saved every N steps (async) and at the end.

Which checkpoints are kept: a checkpoint is *good* once the step after it ran from its state with a finite
loss, finite gradients and a finite new state (`confirm`); the trainer never saves a non-finite state. The
newest checkpoint is kept until the next one is written, along with the newest `keep_last - 1` good ones (at
least one), so the directory holds `keep_last` checkpoints (one more with keep_last = 1) and always one
known-good state. When the step after the newest checkpoint fails (NaN), `discard_unconfirmed` deletes it, so
`latest_step()` is the last good checkpoint: a rerun resumes from a state that gave a finite step.

Orbax writes each checkpoint into a temporary folder and renames it when complete, and older checkpoints are
deleted only after the newer ones were written, so a crash or a full disk during a save leaves the previous
checkpoints usable; restoring places every array directly in its target sharding. A full disk (or quota, or
file-size limit) is raised as `EnvironmentProblem` naming the checkpoint folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

from motab_jax.errors import EnvironmentProblem, MotabInputError, environment_problem

log = logging.getLogger("motab_jax")


def abstract_like(tree: Any) -> Any:
    """Shape/dtype/sharding placeholders of a live pytree (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _os_error_code(error: BaseException) -> int | None:
    """The errno behind a failed write: an OSError's, or the one TensorStore (Orbax's array writer) puts in its
    message ("... No space left on device [os_error_code='28']")."""
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        match = re.search(r"os_error_code='?(\d+)", str(e)) if e is not None else None
        if match:
            return int(match.group(1))
    return None


def disk_problem(error: BaseException, doing: str) -> EnvironmentProblem | None:
    """The `EnvironmentProblem` a failed checkpoint write amounts to (full disk, quota, file-size limit,
    read-only or forbidden folder); None for any other error."""
    code = _os_error_code(error)
    if code is None:
        return None
    return environment_problem(OSError(code, os.strerror(code)), doing)


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep_last: int = 2,
                 async_save: bool = True):
        if save_every < 1 or keep_last < 1:
            raise ValueError(f"save_every={save_every} and keep_last={keep_last} must be >= 1")
        self.directory = Path(directory).absolute()
        self.keep_last = keep_last
        # Retention is ours (see the module doc): Orbax would delete older checkpoints by count alone.
        options = ocp.CheckpointManagerOptions(max_to_keep=None, save_interval_steps=save_every,
                                               enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=True)
        with self._disk_errors("opening the checkpoint folder"):
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        # Every checkpoint but the newest had finite steps after it (a later one was saved).
        self.confirmed: set[int] = set(sorted(self.manager.all_steps())[:-1])

    @contextlib.contextmanager
    def _disk_errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except EnvironmentProblem:
            raise
        except Exception as e:  # noqa: BLE001 - Orbax raises ValueError / OSError / its own; only disk ones change
            problem = disk_problem(e, f"{doing} in {self.directory}")
            if problem is None:
                raise
            kept = sorted(self.manager.all_steps()) if hasattr(self, "manager") else []
            raise EnvironmentProblem(f"{problem} (checkpoints kept: {kept or 'none'})") from e

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def confirm(self, step: int) -> None:
        """The step after checkpoint `step` (if there is one) ran finite from its state: it is good."""
        self.confirmed.add(step)

    def _prune(self, keep: int) -> None:
        """Delete good checkpoints older than the newest `keep` good ones. Called only when no save is in flight,
        at the same steps on every process (manager.delete synchronises processes)."""
        good = [s for s in self.all_steps() if s in self.confirmed]
        for step in good[:-keep]:
            self.manager.delete(step)

    def save(self, step: int, train_state: Any, data_state: dict[str, Any], meta: dict[str, Any],
             *, force: bool = False) -> bool:
        """Save the (finite) state after `step` when `step` is due (every save_every) or `force`."""
        if not force and not self.manager.should_save(step):
            return False
        with self._disk_errors(f"writing checkpoint {step}"):
            self.manager.wait_until_finished()  # the previous save, written whole (or its error raised) ...
            self._prune(max(self.keep_last - 1, 1))  # ... before older ones go (one good one always stays)
            args = ocp.args.Composite(state=ocp.args.StandardSave(train_state), data=ocp.args.JsonSave(data_state),
                                      meta=ocp.args.JsonSave(meta))
            saved = self.manager.save(step, args=args, force=force)
        if saved:
            log.info("checkpoint %d -> %s", step, self.directory)
        return saved

    def discard_unconfirmed(self) -> int | None:
        """Delete the newest checkpoint if no good step followed it; returns the newest left (None: none)."""
        with self._disk_errors("finishing the last checkpoint"):
            self.manager.wait_until_finished()
        latest = self.manager.latest_step()
        if latest is not None and latest not in self.confirmed:
            self.manager.delete(latest)
            log.info("checkpoint %d deleted: the step from its state was not finite", latest)
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                                  meta=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=args)
        except ValueError as e:
            if "do not match" not in str(e) and "shape" not in str(e):
                raise
            raise MotabInputError(f"{self.directory / str(step)}: this checkpoint does not fit the model and optimizer "
                                  f"being trained ({str(e).splitlines()[0]}); it was written by a job with another "
                                  "model or optimizer: train into another folder, or delete the checkpoints to "
                                  "start over") from e
        return restored["state"], restored["data"], restored["meta"]

    def wait(self) -> None:
        with self._disk_errors("writing the last checkpoint"):
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
            self._prune(self.keep_last)
        except BaseException:
            with contextlib.suppress(Exception):  # it would raise the same failed save again
                self.manager.close()
            raise
        self.manager.close()


__all__ = ["Checkpointer", "abstract_like", "disk_problem"]
