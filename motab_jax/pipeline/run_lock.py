"""One job per run directory: `hold_run_dir(run_dir)` holds `<run_dir>/job.lock` for the job's lifetime.

Two jobs on one directory would append every record twice and train over each other's checkpoints, so the
second job stops at once with an error naming the holder (pid, host, start time, command).

How the lock works, and where it does not:
- `fcntl.flock` on the lock file is the lock. The kernel drops it when the holder dies however it dies
  (SIGKILL, OOM, power loss of a local disk), so a killed job's lock is free for the next job without any
  clean-up: a stale lock file is simply taken over.
- The holder writes who it is into the file, and rewrites it every `HEARTBEAT_S` seconds (a "heartbeat"), and
  marks it released when it ends. On NFS, Linux implements flock with POSIX byte-range locks, which hold across
  hosts (NFSv4, or NFSv3 with lockd). On a FUSE file system such as gcsfuse, flock is only local to one host,
  and on some NFS mounts flock fails (ENOLCK). So after taking flock (or when flock is not available) the file's
  content is checked too: a holder on another host (or, without flock, a live pid on this host) whose
  heartbeat is younger than `STALE_AFTER_S` is taken to be alive and the job is refused; an older one is
  taken over with a warning. Hosts' clocks are assumed to agree within a minute or so.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from motab_jax.errors import EnvironmentProblem

log = logging.getLogger("motab_jax")

LOCK_NAME = "job.lock"
HEARTBEAT_S = 60.0  # how often the holder rewrites its heartbeat
STALE_AFTER_S = 300.0  # a holder silent for longer is taken to be dead (only where flock cannot tell)


class RunDirLocked(EnvironmentProblem):
    """Another job holds the run directory."""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another job (it has not written its details yet)"
    return (f"job pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')} "
            f"({holder.get('command', '?')})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunDirLock:
    """The held lock; `release()` (or leaving `hold_run_dir`) frees it."""

    def __init__(self, path: Path, fd: int, flocked: bool):
        self.path, self.fd, self.flocked = path, fd, flocked
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                       "command": " ".join(sys.argv) or sys.executable}
        self._stop = threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._beat, name="run-dir-lock-heartbeat", daemon=True)
        self._thread.start()

    def _write(self, *, released: bool = False) -> None:
        content = dict(self.holder, heartbeat=time.time(), heartbeat_at=_now())
        if released:
            content["released"] = _now()
        data = (json.dumps(content) + "\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except OSError as e:  # a full disk must not kill the job; the flock still holds
                log.warning("could not refresh %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._write(released=True)
        except OSError as e:
            log.warning("could not mark %s released: %s", self.path, e)
        if self.flocked:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):  # being written, or not ours: no details
        return {}


def _refusal(path: Path, holder: dict[str, Any], why: str) -> RunDirLocked:
    pid = holder.get("pid")
    stop = f" (`kill {pid}` on {holder.get('host')})" if pid else ""
    return RunDirLocked(f"run_dir {path.parent} is in use by {_describe(holder)}{why}: two jobs on one run "
                        f"directory would write every record twice. Wait for that job to end or stop it{stop}, "
                        f"or give this job another run_dir. (lock file: {path})")


def _live_elsewhere(holder: dict[str, Any], flocked: bool) -> bool:
    """True when the file's last holder looks alive although we hold (or cannot use) flock."""
    if not holder or holder.get("released"):
        return False
    if holder.get("host") == socket.gethostname():
        # flock is authoritative on one host: we got it, so the holder is gone. Without flock, ask the kernel.
        return not flocked and isinstance(holder.get("pid"), int) and _pid_alive(holder["pid"]) \
            and holder["pid"] != os.getpid()
    age = time.time() - float(holder.get("heartbeat", 0))
    return age < STALE_AFTER_S


def acquire_run_dir(run_dir: str | os.PathLike) -> RunDirLock:
    """Take `<run_dir>/job.lock`, or raise `RunDirLocked` naming its holder (see the module doc)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise EnvironmentProblem(f"run_dir {path.parent}: cannot create the lock file {path} ({e.strerror}); "
                                 "give a run_dir on a writable file system") from e
    flocked = True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise _refusal(path, _read_holder(path), "") from None
        flocked = False  # ENOLCK / EOPNOTSUPP / EINVAL: this file system has no flock; the heartbeat decides
        log.warning("run_dir %s: file locking is not available here (%s); relying on the lock file's heartbeat",
                    path.parent, e.strerror)
    holder = _read_holder(path)
    if _live_elsewhere(holder, flocked):
        if flocked:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        age = time.time() - float(holder.get("heartbeat", 0))
        raise _refusal(path, holder, f", alive {age:.0f} s ago (if it is gone, delete the lock file or wait "
                                     f"{STALE_AFTER_S - age:.0f} s)")
    if holder and not holder.get("released"):
        log.warning("run_dir %s: taking over the lock of %s, which ended without releasing it", path.parent,
                    _describe(holder))
    return RunDirLock(path, fd, flocked)


@contextlib.contextmanager
def hold_run_dir(run_dir: str | os.PathLike) -> Iterator[RunDirLock]:
    """Hold the run directory's lock for the `with` block."""
    lock = acquire_run_dir(run_dir)
    try:
        yield lock
    finally:
        lock.release()
