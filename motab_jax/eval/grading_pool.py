"""Grading in killable worker processes: ``GradingPool`` for batches, ``shared_grade`` for one item at a time.

A worker is a fresh interpreter (``python -c <boot> ... grading_worker.py``) started with ``subprocess``, not
``multiprocessing``: a spawned multiprocessing child re-imports the caller's ``__main__``, which re-runs a
script's top-level code (and, in a script without an ``if __name__ == "__main__"`` guard, makes every worker
fail to start). Each worker has its own socket pair, so killing one cannot corrupt another's channel; it gets
the parent's ``sys.path`` and imports math-verify but not ``motab_jax`` (JAX).
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import multiprocessing.connection as mp_connection
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from motab_jax.eval.grading import DEFAULT_TIMEOUT_S, GradeResult, _check_kind, prepare_completion

logger = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).resolve().with_name("grading_worker.py")
# argv: the parent's sys.path (JSON), the worker script, the socket's fd, the memory limit in MB (0: none).
_BOOT = ("import json, runpy, sys; sys.path[:] = json.loads(sys.argv[1]); "
         "runpy.run_path(sys.argv[2], run_name='__main__')")


class _WorkerProcess:
    """A worker's ``subprocess.Popen`` with the ``multiprocessing.Process`` calls the pool (and tests) use."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self._popen, self.pid = popen, popen.pid

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def kill(self) -> None:
        if self.is_alive():
            self._popen.kill()

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()


@dataclass
class _Worker:
    """Parent-side handle of one worker; ``item`` is the batch index it holds, if any."""

    proc: _WorkerProcess
    conn: Connection
    spawned_at: float
    ready: bool = False
    item: int | None = None
    sent_at: float = 0.0
    tasks_done: int = 0


class GradingPool:
    """Grades ``(kind, completion, gold)`` items in killable worker processes.

    Workers are fresh interpreters (see the module docstring): safe after JAX started threads, and in
    daemonic processes, which multiprocessing forbids to have children. A worker holding an item longer than
    ``item_timeout`` seconds is SIGKILLed (never waited for) and replaced; a crashed one is replaced
    and its item retried once (the OOM killer is not the item's fault), then reported with
    ``error``; workers are retired after ``max_tasks_per_worker`` items
    (bounds sympy cache growth). ``memory_limit_mb`` is the address space a worker may add beyond
    its startup footprint (RLIMIT_AS), so runaway arithmetic raises MemoryError rather than
    exhausting the host; None disables it.

    Not thread-safe. ``pool._workers`` lists the live ``_Worker`` handles (``.proc`` is the
    process), which tests use to kill a worker.
    """

    def __init__(self, num_workers: int = 2, item_timeout: float = DEFAULT_TIMEOUT_S, max_tasks_per_worker: int = 200,
                 *, memory_limit_mb: int | None = 4096, startup_timeout: float = 60.0) -> None:
        if num_workers < 1 or max_tasks_per_worker < 1 or not item_timeout > 0 or not startup_timeout > 0:
            raise ValueError("num_workers, max_tasks_per_worker, item_timeout, startup_timeout must be positive")
        self.num_workers, self.item_timeout = num_workers, float(item_timeout)
        self.max_tasks_per_worker, self.memory_limit_mb = max_tasks_per_worker, memory_limit_mb
        self.startup_timeout = float(startup_timeout)
        self._workers: list[_Worker] = []
        self._closed = False

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        try:
            popen = subprocess.Popen(
                [sys.executable, "-c", _BOOT, json.dumps(sys.path), str(WORKER_SCRIPT), str(fd),
                 str(self.memory_limit_mb or 0)], pass_fds=(fd,), stdin=subprocess.DEVNULL)
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()  # the worker's end lives only in the worker: its death reads as EOF
        conn = Connection(parent_sock.detach())
        self._workers.append(_Worker(proc=_WorkerProcess(popen), conn=conn, spawned_at=time.monotonic()))

    def start(self) -> None:
        """Starts workers up to ``num_workers`` without waiting for them (``grade`` starts them as needed):
        their start-up (about a second) then overlaps the caller's work."""
        if self._closed:
            raise RuntimeError("GradingPool is closed")
        while len(self._workers) < self.num_workers:
            self._spawn()

    def _kill(self, worker: _Worker) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
        if worker.proc.is_alive():
            worker.proc.kill()
        worker.proc.join(timeout=5.0)
        worker.conn.close()

    def _retire(self, worker: _Worker) -> None:
        try:
            worker.conn.send(None)
            worker.proc.join(timeout=2.0)
        except OSError:
            pass
        self._kill(worker)

    def close(self) -> None:
        """Stops all workers (idle ones asked to exit, the rest killed). Idempotent."""
        self._closed = True
        for worker in list(self._workers):
            (self._retire if worker.ready and worker.item is None else self._kill)(worker)

    def grade(self, items: list[tuple[str, str, str]], deadline: float | None = None) -> list[GradeResult]:
        """Grades ``(kind, completion, gold)`` items; results come back in the same order.

        ``deadline`` is a budget in seconds for the whole call, counted from entry: items not done
        by then come back ``timed_out`` (workers holding them are killed). Without it the call is
        bounded by the per-item timeout. Never raises on adversarial completions; an unknown kind
        raises ValueError before any work starts.
        """
        if self._closed:
            raise RuntimeError("GradingPool is closed")
        for kind, _, _ in items:
            _check_kind(kind)
        end = None if deadline is None else time.monotonic() + max(float(deadline), 0.0)
        results: list[GradeResult | None] = [None] * len(items)
        pending = collections.deque(range(len(items)))
        attempts = [0] * len(items)
        failures = 0  # workers that died or hung before becoming ready: a broken environment
        while pending or any(w.item is not None for w in self._workers):
            if end is not None and time.monotonic() >= end:
                self._expire(results, pending, "batch deadline exceeded")
                break
            if failures > 2 * self.num_workers + 2:
                logger.error("grading workers failed to start; %d items not graded", len(pending))
                self._expire(results, pending, "grading workers failed to start", timed_out=False)
                break
            while len(self._workers) < self.num_workers and pending:
                self._spawn()
            for worker in self._workers:
                if pending and worker.ready and worker.item is None:
                    idx = pending.popleft()
                    kind, completion, gold = items[idx]
                    try:  # a prepared completion (<= 10k chars) fits the pipe buffer: send cannot block
                        worker.conn.send((kind, prepare_completion(completion), gold))
                    except (OSError, ValueError):  # died between messages: retry the item elsewhere
                        pending.appendleft(idx)
                        failures += 1
                        self._kill(worker)
                        break
                    worker.item, worker.sent_at = idx, time.monotonic()
                    attempts[idx] += 1
            failures += self._wait_and_collect(results, end, pending, attempts)
        return [r or GradeResult(correct=False, timed_out=True, error="not graded") for r in results]

    def _wait_and_collect(self, results: list[GradeResult | None], end: float | None,
                          pending: collections.deque, attempts: list[int]) -> int:
        """Waits for a message or the next expiry and records results; returns startup failures."""
        now = time.monotonic()
        expiries = [now + 1.0] + ([end] if end is not None else [])
        for w in self._workers:
            if w.item is not None:
                expiries.append(w.sent_at + self.item_timeout)
            elif not w.ready:
                expiries.append(w.spawned_at + self.startup_timeout)
        ready = mp_connection.wait([w.conn for w in self._workers], timeout=max(0.0, min(expiries) - now))
        failures = 0
        for worker in [w for w in self._workers if w.conn in ready]:
            try:
                msg = worker.conn.recv()
            except (EOFError, OSError):
                msg = None
            if msg is None:  # the worker died
                worker.proc.join(timeout=1.0)
                if worker.item is not None and attempts[worker.item] < 2:
                    pending.appendleft(worker.item)
                elif worker.item is not None:
                    results[worker.item] = GradeResult(
                        correct=False, error=f"grading worker crashed (exit code {worker.proc.exitcode})")
                elif not worker.ready:
                    failures += 1
                self._kill(worker)
            elif msg == "ready":
                worker.ready = True
            elif worker.item is not None:
                correct, extracted, error = msg
                results[worker.item] = GradeResult(correct=correct, extracted=extracted, error=error)
                worker.item, worker.tasks_done = None, worker.tasks_done + 1
                if worker.tasks_done >= self.max_tasks_per_worker:
                    self._retire(worker)
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.item is not None and now >= worker.sent_at + self.item_timeout:
                results[worker.item] = GradeResult(correct=False, timed_out=True,
                                                   error=f"timed out after {self.item_timeout:g} s")
                self._kill(worker)
            elif not worker.ready and now >= worker.spawned_at + self.startup_timeout:
                failures += 1
                self._kill(worker)
        return failures

    def _expire(self, results: list[GradeResult | None], pending: collections.deque, reason: str,
                timed_out: bool = True) -> None:
        for worker in list(self._workers):
            if worker.item is not None:
                results[worker.item] = GradeResult(correct=False, timed_out=timed_out, error=reason)
                self._kill(worker)
        while pending:
            results[pending.popleft()] = GradeResult(correct=False, timed_out=timed_out, error=reason)


# ----------------------------------------------------------------------------- one item at a time
_shared_lock = threading.Lock()
_shared: dict[int, GradingPool] = {}  # by process id: a forked child starts its own worker


def shared_grade(kind: str, completion: str, gold: str, timeout: float) -> GradeResult:
    """Grades one item in this process's shared one-worker pool within ``timeout`` seconds (``grading.grade``).

    Calls take turns (a lock). After each call a replacement for a retired or killed worker is started at
    once, so only the first call of the process waits for a worker's start-up.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout={timeout!r}: give seconds > 0 (or None to grade in this process without a bound)")
    with _shared_lock:
        pool = _shared.get(os.getpid())
        if pool is None:
            pool = _shared[os.getpid()] = GradingPool(num_workers=1, item_timeout=timeout, max_tasks_per_worker=1000)
        pool.item_timeout = float(timeout)
        result = pool.grade([(kind, completion, gold)])[0]
        try:
            pool.start()
        except OSError as e:  # cannot start a process now: the next call tries again
            logger.warning("could not start a grading worker in advance: %s", e)
    return result


@atexit.register
def _close_shared() -> None:
    pool = _shared.pop(os.getpid(), None)
    if pool is not None:
        pool.close()
