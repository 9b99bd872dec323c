"""Grading of model completions for math benchmarks, robust against adversarial output.

Graders strip ``<think>...</think>`` and look only at the final answer text:
``grade_math`` (math-verify on the last ``\\boxed{}``), ``grade_gsm8k`` (final number, |a-b| <= 1e-6)
and ``grade_choice`` (A-D letter, GPQA style).

The grader functions run in the calling process with NO time limit: math-verify's ``signal.alarm``
timeout is disabled (it only works in the main thread). A pathological completion such as
``\\boxed{9^{9^{9^{9^{9}}}}}`` can hang a direct call. Untrusted output goes through ``GradingPool``,
which runs the same ``grade_one`` in killable worker processes with per-item timeouts and a deadline.

Cheap guards on every path: only the last ``MAX_COMPLETION_CHARS`` characters after the thinking are
graded (the answer is at the end; this bounds regex and parser cost on megabyte outputs); NUL bytes
are dropped and lone surrogates become "?"; answers nested deeper than ``MAX_BRACE_DEPTH`` braces are
rejected unparsed (math-verify's cost grows exponentially with nesting: ``{{...{2}...}}`` 13 deep took
5 s, doubling per level; real answers rarely nest 5 deep). These guards do not make direct calls
hang-proof (``\boxed{10^{10^{10}}}`` is short and shallow); only the pool's timeouts do.
"""

from __future__ import annotations

import collections
import functools
import logging
import multiprocessing
import multiprocessing.connection as mp_connection
import os
import re
import runpy
import signal
import time
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import math_verify
from math_verify import ExprExtractionConfig, LatexExtractionConfig

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("math", "gsm8k", "choice")
MAX_COMPLETION_CHARS = 10_000
MAX_BRACE_DEPTH = 12
MAX_EXTRACTED_CHARS = 1_000

_GOLD_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
_PRED_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


# math-verify warns once that its timeout is disabled; here that is deliberate (see above).
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(lambda r: not str(r.msg).startswith("Timeout is disabled"))


@dataclass(frozen=True)
class GradeResult:
    """Outcome of grading one completion.

    ``correct`` is False on timeout or error; ``timed_out`` marks the per-item timeout or the batch
    deadline (pool only); ``extracted`` is the grader's answer string (clipped to
    ``MAX_EXTRACTED_CHARS``); ``error`` describes a failure (timeout, crashed worker, exception).
    """

    correct: bool
    timed_out: bool = False
    extracted: str | None = None
    error: str | None = None


# ----------------------------------------------------------------------------- text helpers
def strip_thinking(text: str) -> str:
    """Returns the text after the last ``</think>`` (the whole text when there is none)."""
    idx = text.rfind("</think>")
    return text if idx < 0 else text[idx + len("</think>"):]


def _sanitize(text: object) -> str:
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    elif not isinstance(text, str):
        text = "" if text is None else str(text)
    # Lone surrogates (surrogateescape-decoded bytes) cannot be encoded to UTF-8 for JSON output.
    return text.replace("\x00", "").encode("utf-8", errors="replace").decode("utf-8")


def prepare_completion(completion: str) -> str:
    """Strips thinking, keeps the last ``MAX_COMPLETION_CHARS`` characters, sanitises.

    Idempotent: the pool applies it in the parent (less data through the pipe) and the grader
    applies it again in the worker without changing the result.
    """
    text = strip_thinking(completion if isinstance(completion, str) else _sanitize(completion))
    return _sanitize(text[-MAX_COMPLETION_CHARS:])


def _clip(answer: str | None) -> str | None:
    return None if answer is None else answer[:MAX_EXTRACTED_CHARS]


def _max_brace_depth(text: str) -> int:
    depth = best = 0
    for ch in text:
        if ch == "{":
            depth += 1
            best = max(best, depth)
        elif ch == "}":
            depth = max(depth - 1, 0)
    return best


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces, else None.

    Only the last box counts: math-verify alone joins nearby boxes (``\\boxed{3}, or \\boxed{4}``)
    into a set, which would reward hedging.
    """
    pos = len(text)
    while True:
        start = max(text.rfind("\\boxed", 0, pos), text.rfind("\\fbox", 0, pos))
        if start < 0:
            return None
        i = start + (6 if text.startswith("\\boxed", start) else 5)
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            break
        pos = start  # "\boxed" not followed by "{": look further left
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None  # unbalanced: truncated output


# ----------------------------------------------------------------------------- math
@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    gold = _sanitize(gold).strip()
    if _max_brace_depth(gold) > MAX_BRACE_DEPTH:
        return ()
    keep = "\\boxed" in gold or "\\fbox" in gold or (len(gold) > 1 and gold[0] == gold[-1] == "$")
    # Bare "(-\infty, 2]" parses as the number 2 and a bare "\frac{..}" not at all: box it first.
    for cand in ([gold] if keep else []) + [f"\\boxed{{{gold}}}", f"${gold}$", gold]:
        parsed = math_verify.parse(cand, extraction_config=_GOLD_CONFIG, parsing_timeout=None)
        if parsed:
            return tuple(parsed)
    return ()


_BOX_START_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _math_extract(text: str) -> tuple[list, str | None]:
    """(math-verify parse, answer string) of a prepared completion."""
    boxed = last_boxed_content(text)
    if boxed is None and _BOX_START_RE.search(text):
        return [], None  # the last box is cut off: no answer (math-verify would take an earlier box)
    target = f"\\boxed{{{boxed}}}" if boxed is not None else text
    if _max_brace_depth(target) > MAX_BRACE_DEPTH:
        return [], boxed
    parsed = math_verify.parse(target, extraction_config=_PRED_CONFIG, parsing_timeout=None)
    if boxed is None and parsed and isinstance(parsed[-1], str):
        boxed = parsed[-1]  # math-verify's matched answer text ("The answer is 1/2" -> "1/2")
    return parsed, boxed


def _grade_math(completion: str, gold_answer: str) -> tuple[bool, str | None]:
    parsed, extracted = _math_extract(prepare_completion(completion))
    gold = _parse_gold(_sanitize(gold_answer)) if parsed else ()
    ok = bool(gold) and bool(math_verify.verify(list(gold), parsed, timeout_seconds=None))
    return ok, _clip(extracted)


def grade_math(completion_text: str, gold_answer: str) -> bool:
    """Whether the completion's final answer is mathematically equal to ``gold_answer``.

    Thinking is stripped; the last ``\\boxed{}`` (else math-verify's own answer search over the last
    ``MAX_COMPLETION_CHARS`` characters) is parsed and compared with ``math_verify.verify``. The gold
    may be plain ("1/2", "\\frac{\\sqrt{3}}{2}", "(-\\infty, 2]"), boxed or in ``$...$``.
    No timeout: use ``GradingPool`` for untrusted completions.
    """
    return _grade_math(completion_text, gold_answer)[0]


# ----------------------------------------------------------------------------- gsm8k
# A "-" is a sign only when not a hyphen after a word/number ("3-4" -> 4, "is -4" -> -4).
_NUMBER_RE = re.compile(r"(?:(?<![\w)])-)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")


def _canonical_number(raw: str) -> str:
    s = raw.replace(",", "")
    sign, s = ("-", s[1:]) if s.startswith("-") else ("", s)
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    int_part, _, frac = s.partition(".")
    s = (int_part.lstrip("0") or "0") + (f".{frac}" if frac else "")
    return s if s == "0" else sign + s


def extract_last_number(text: str) -> str | None:
    """The final number of a text, canonicalised ("$1,234.50." -> "1234.5"), or None.

    The last number inside the last ``\\boxed{}`` wins when there is one, else the last number in
    the text. Commas are thousands separators; "$" and a trailing "." are ignored.
    """
    text = _sanitize(text)
    for source in (last_boxed_content(text), text):
        numbers = _NUMBER_RE.findall(source) if source else []
        if numbers:
            return _canonical_number(numbers[-1])
    return None


def _numbers_equal(a: str, b: str) -> bool:
    try:
        return abs(Fraction(a) - Fraction(b)) <= Fraction(1, 10**6)
    except (ValueError, ZeroDivisionError):
        return a == b  # beyond int()'s digit limit: compare the canonical texts


def _grade_gsm8k(completion: str, gold: str) -> tuple[bool, str | None]:
    pred = extract_last_number(prepare_completion(completion))
    gold = _sanitize(gold)
    ref = extract_last_number(gold[gold.rfind("####") + 4:] if "####" in gold else gold)
    return pred is not None and ref is not None and _numbers_equal(pred, ref), _clip(pred)


def grade_gsm8k(completion: str, gold: str) -> bool:
    """Whether the final number equals the gold number (a bare number or "... #### 42")."""
    return _grade_gsm8k(completion, gold)[0]


# ----------------------------------------------------------------------------- choice
_CHOICE_BOXED_RE = re.compile(r"^(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?\(?\s*([A-D])\s*\)?\s*\}?$")
_CHOICE_RES = (  # in priority order; within one the last match wins
    re.compile(r"(?i:answer)(?:\s+(?i:is))?\s*[:：]?\s*(?:\*\*|\$|\\text\{)?\s*\(?([A-D])\)?(?![A-Za-z0-9])"),
    re.compile(r"\(\s*([A-D])\s*\)"),
    re.compile(r"(?<![A-Za-z0-9_\\])([A-D])(?![A-Za-z0-9_])"),
)


def extract_choice_letter(text: str) -> str | None:
    """The chosen A-D letter, or None.

    Priority: the last ``\\boxed{C}`` (also ``\\boxed{(C)}``, ``\\boxed{\\text{C}}``), then the last
    "Answer: C" / "answer is (C)", then the last "(C)", then the last standalone capital A-D.
    """
    text = _sanitize(text)
    m = _CHOICE_BOXED_RE.match(last_boxed_content(text) or "")
    if m:
        return m.group(1)
    for pattern in _CHOICE_RES:
        found = pattern.findall(text)
        if found:
            return found[-1]
    return None


def _grade_choice(completion: str, gold_letter: str) -> tuple[bool, str | None]:
    pred = extract_choice_letter(prepare_completion(completion))
    ref = extract_choice_letter(_sanitize(gold_letter).strip().upper())
    return pred is not None and pred == ref, pred


def grade_choice(completion: str, gold_letter: str) -> bool:
    """Whether the completion picks ``gold_letter`` ("C" or "(C)", case-insensitive)."""
    return _grade_choice(completion, gold_letter)[0]


# ----------------------------------------------------------------------------- dispatch
_GRADERS = {"math": _grade_math, "gsm8k": _grade_gsm8k, "choice": _grade_choice}


def _check_kind(kind: str) -> None:
    if kind not in _GRADERS:
        raise ValueError(f"unknown grading kind {kind!r}; expected one of {KINDS}")


def extracted_answer(kind: str, completion: str) -> str | None:
    """The answer string the ``kind`` grader extracts (for per-sample logs; no gold needed).

    "math": the last boxed content, else math-verify's matched text; "gsm8k": the canonical
    number; "choice": the letter. Clipped to ``MAX_EXTRACTED_CHARS``.
    """
    _check_kind(kind)
    text = prepare_completion(completion)
    if kind == "math":
        return _clip(_math_extract(text)[1])
    return _clip(extract_last_number(text) if kind == "gsm8k" else extract_choice_letter(text))


def grade_one(kind: str, completion: str, gold: str) -> GradeResult:
    """Grades one item in this process without a timeout (what each pool worker runs).

    Grader exceptions become ``GradeResult(correct=False, error=...)``; an unknown kind raises.
    """
    _check_kind(kind)
    try:
        correct, extracted = _GRADERS[kind](completion, gold)
    except Exception as e:  # noqa: BLE001 - adversarial input must not crash the caller
        return GradeResult(correct=False, error=_describe(e))
    return GradeResult(correct=bool(correct), extracted=extracted)


def _describe(e: BaseException) -> str:
    try:
        msg = str(e)
    except Exception:  # noqa: BLE001 - str() of exotic exceptions can fail
        msg = ""
    return f"{type(e).__name__}: {msg}"[:300]


# ----------------------------------------------------------------------------- pool
_WORKER_RUN_NAME = "__motab_grading_worker__"


@dataclass
class _Worker:
    """Parent-side handle of one worker; ``item`` is the batch index it holds, if any."""

    proc: BaseProcess
    conn: Connection
    spawned_at: float
    ready: bool = False
    item: int | None = None
    sent_at: float = 0.0
    tasks_done: int = 0


class GradingPool:
    """Grades ``(kind, completion, gold)`` items in killable worker processes.

    Workers are started with "spawn" (fresh interpreters: safe after JAX started threads) and run
    this file through ``runpy``, so they import math-verify but not ``motab_jax`` (JAX); like any
    spawn child they still import the caller's ``__main__`` module. Each worker has its own pipe, so
    killing one cannot corrupt another's channel. A worker holding an item longer than
    ``item_timeout`` seconds is SIGKILLed (never waited for) and replaced; a crashed one is replaced
    and its item retried once (the OOM killer is not the item's fault), then reported with
    ``error``; workers are retired after ``max_tasks_per_worker`` items
    (bounds sympy cache growth). ``memory_limit_mb`` is the address space a worker may add beyond
    its startup footprint (RLIMIT_AS), so runaway arithmetic raises MemoryError rather than
    exhausting the host; None disables it.

    Not thread-safe. ``pool._workers`` lists the live ``_Worker`` handles (``.proc`` is the
    process), which tests use to kill a worker.
    """

    def __init__(self, num_workers: int = 2, item_timeout: float = 5.0, max_tasks_per_worker: int = 200,
                 *, memory_limit_mb: int | None = 4096, startup_timeout: float = 60.0) -> None:
        if num_workers < 1 or max_tasks_per_worker < 1 or not item_timeout > 0 or not startup_timeout > 0:
            raise ValueError("num_workers, max_tasks_per_worker, item_timeout, startup_timeout must be positive")
        self.num_workers, self.item_timeout = num_workers, float(item_timeout)
        self.max_tasks_per_worker, self.memory_limit_mb = max_tasks_per_worker, memory_limit_mb
        self.startup_timeout = float(startup_timeout)
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._closed = False

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        init = {"_WORKER_CONN": child_conn, "_WORKER_MEMORY_LIMIT_MB": self.memory_limit_mb}
        proc = self._ctx.Process(target=runpy.run_path, args=(os.path.abspath(__file__),),
                                 kwargs={"init_globals": init, "run_name": _WORKER_RUN_NAME},
                                 name="motab-grading-worker", daemon=True)
        proc.start()
        child_conn.close()  # the worker's end lives only in the worker: its death reads as EOF
        self._workers.append(_Worker(proc=proc, conn=parent_conn, spawned_at=time.monotonic()))

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


def _limit_address_space(extra_mb: int) -> None:
    try:
        import resource

        with open("/proc/self/status") as f:
            vm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
        soft = vm_kb * 1024 + extra_mb * 2**20
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (soft if hard < 0 else min(soft, hard), hard))
    except (ImportError, OSError, StopIteration, ValueError):
        pass  # not Linux: run without the limit


def _worker_main(conn: Connection, memory_limit_mb: int | None) -> None:
    """Worker loop: receives (kind, completion, gold), sends (correct, extracted, error); None stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    grade_math("\\boxed{1}", "1")  # import and warm the parser before the footprint is measured
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
            r = grade_one(*task)
            reply = (r.correct, r.extracted, r.error)
        except BaseException as e:  # noqa: BLE001 - e.g. MemoryError raised outside the graders
            reply = (False, None, _describe(e))
        conn.send(reply)


if __name__ == _WORKER_RUN_NAME:
    _worker_main(globals()["_WORKER_CONN"], globals()["_WORKER_MEMORY_LIMIT_MB"])
