"""A grading worker process: ``python grading_worker.py <socket fd> <memory limit MB, 0: none>``.

Started by ``grading_pool.GradingPool``. It loads ``grading.py`` by path (not the ``motab_jax`` package, which
imports JAX), says "ready", then answers each ``(kind, completion, gold)`` message with ``(correct, extracted,
error)`` until it receives None or its socket closes.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType


def _load_grading() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_motab_grading", Path(__file__).resolve().with_name("grading.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _limit_address_space(extra_mb: int) -> None:
    """RLIMIT_AS = the current footprint + ``extra_mb``: runaway arithmetic raises MemoryError instead of
    exhausting the host."""
    try:
        import resource

        with open("/proc/self/status") as f:
            vm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
        soft = vm_kb * 1024 + extra_mb * 2**20
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (soft if hard < 0 else min(soft, hard), hard))
    except (ImportError, OSError, StopIteration, ValueError):
        pass  # not Linux: run without the limit


def main(fd: int, memory_limit_mb: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = Connection(fd)
    grading = _load_grading()
    grading.grade_one("math", "\\boxed{1}", "1")  # import and warm the parser before the footprint is measured
    if memory_limit_mb:
        _limit_address_space(memory_limit_mb)
    conn.send("ready")
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            result = grading.grade_one(*task)
            reply = (result.correct, result.extracted, result.error)
        except BaseException as e:  # noqa: BLE001 - e.g. MemoryError raised outside the graders
            reply = (False, None, grading._describe(e))
        conn.send(reply)


if __name__ == "__main__":
    main(int(sys.argv[3]), int(sys.argv[4]))
