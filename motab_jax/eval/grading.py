"""Grading of model completions for math benchmarks, robust against adversarial output.

Graders strip ``<think>...</think>`` and look only at the final answer text: "math" (math-verify on the last
``\\boxed{}``), "gsm8k" (final number, |a-b| <= 1e-6) and "choice" (A-D letter, GPQA style).

Public graders are bounded in time: ``grade`` (and ``grade_math``, ``grade_gsm8k``, ``grade_choice`` on top of
it) runs the grader in a persistent worker process and kills it after ``timeout`` seconds (default
``DEFAULT_TIMEOUT_S``); a timed-out item is wrong and marked ``timed_out``. In-process grading has no bound:
math-verify's ``signal.alarm`` timeout only works in the main thread and cannot interrupt sympy's C loops (a
pathological ``\\boxed{9^{9^{9^{9^{9}}}}}`` runs for minutes), so ``grade_one`` (what the workers run) is for
trusted input or for callers that add their own bound. Batches go through ``GradingPool`` (several workers, a
batch deadline): the fast path for evaluation.

What is graded. With a complete last ``\\boxed{}`` (or ``\\fbox{}``), its content. Without one, only an
explicit final-answer statement, as the authors' harness (EvalScope's math parser) anchors it: the last "the
answer is", "final answer is", "answer:" (or "答案是"), and of it only the first clause of that line, up to
``MAX_ANCHORED_ANSWER_CHARS`` characters. Never the last number or formula of the text (EvalScope's last
resort, and math-verify's anchor-free search): that is whatever a truncated or looping output wrote last. A
completion whose tail is a loop (``ends_in_loop``) has no unboxed answer at all, for every kind.

Cheap guards on every path: only the last ``MAX_COMPLETION_CHARS`` characters after the thinking are
graded (the answer is at the end; this bounds regex and parser cost on megabyte outputs); NUL bytes
are dropped and lone surrogates become "?"; answers nested deeper than ``MAX_BRACE_DEPTH`` braces are
rejected unparsed (math-verify's cost grows exponentially with nesting: ``{{...{2}...}}`` 13 deep took
5 s, doubling per level; real answers rarely nest 5 deep). These guards do not bound in-process grading
(``\\boxed{10^{10^{10}}}`` is short and shallow); only the worker timeouts do.

This file imports only the standard library and math-verify: the grading workers load it by path
(``grading_worker.py``), without the ``motab_jax`` package and its JAX import.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import math_verify
from math_verify import ExprExtractionConfig, LatexExtractionConfig

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("math", "gsm8k", "choice")
MAX_COMPLETION_CHARS = 10_000
MAX_BRACE_DEPTH = 12
MAX_EXTRACTED_CHARS = 1_000
MAX_ANCHORED_ANSWER_CHARS = 100
DEFAULT_TIMEOUT_S = 5.0  # seconds a public grader call may grade (also GradingPool's per-item default)
LOOP_WINDOW_CHARS = 1_000  # ends_in_loop: a tail this long ...
LOOP_MAX_UNIT_CHARS = 250  # ... made of one repeated unit at most this long (so at least 4 copies)

_GOLD_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
_PRED_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


# math-verify warns once that its timeout is disabled; here that is deliberate (see above).
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(lambda r: not str(r.msg).startswith("Timeout is disabled"))


@dataclass(frozen=True)
class GradeResult:
    """Outcome of grading one completion.

    ``correct`` is False on timeout or error; ``timed_out`` marks the per-item timeout or the batch
    deadline; ``extracted`` is the grader's answer string (clipped to
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


def ends_in_loop(text: str) -> bool:
    """Whether the text ends in a loop: its last ``LOOP_WINDOW_CHARS`` characters (trailing whitespace
    aside) repeat one unit of at most ``LOOP_MAX_UNIT_CHARS`` characters, i.e. at least 4 copies of it.

    A degenerate output ("1 1 1 ...", "So the answer is 1. So the answer is 1. ...") that ran into the
    token budget; whatever number or phrase it repeats is not a final answer.
    """
    t = text.rstrip()
    n, w = len(t), LOOP_WINDOW_CHARS
    tail = t[n - w:]
    return any(t[n - w - p:n - p] == tail for p in range(1, LOOP_MAX_UNIT_CHARS + 1) if n >= w + p)


# The authors' harness (EvalScope's math parser, from Qwen2.5-Math) takes an unboxed answer after these phrases.
_ANCHOR_RE = re.compile(r"(?i:final answer is|the answer is|answer(?:\*\*)?\s*:)|答案是")
_DELIMITED_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]")
_CLAUSE_END_RE = re.compile(r"\.(?=\s|$)|,\s|;")  # "3.5" and "1,000" stay whole


def anchored_answer(text: str) -> str | None:
    """The answer of the text's last final-answer statement ("The answer is 42." -> "42"), else None.

    The statement is the last "the answer is", "final answer is", "answer:" (any case; also "**Answer:**"
    and "答案是"); its answer is the ``$...$`` / ``\\(...\\)`` / ``\\[...\\]`` that follows, or else the rest of the
    line up to the end of the clause (". ", ", ", ";"), markdown bold removed. None when there is no such
    statement, when the answer is empty or longer than ``MAX_ANCHORED_ANSWER_CHARS``, and when the text
    ``ends_in_loop``.
    """
    last = None
    for last in _ANCHOR_RE.finditer(text):
        pass
    if last is None or ends_in_loop(text):
        return None
    line = text[last.end():].lstrip(" \t:*").split("\n", 1)[0]
    delimited = _DELIMITED_RE.match(line)
    if delimited:
        answer = next(group for group in delimited.groups() if group is not None)
    else:
        answer = _CLAUSE_END_RE.split(line, maxsplit=1)[0].strip().strip("*").strip()
    answer = answer.strip()
    return answer if 0 < len(answer) <= MAX_ANCHORED_ANSWER_CHARS else None


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


def _math_answer(text: str) -> str | None:
    """The answer string of a prepared completion: the last box's content, else the anchored answer."""
    boxed = last_boxed_content(text)
    if boxed is not None:
        return boxed
    if _BOX_START_RE.search(text):
        return None  # the last box is cut off: no answer (math-verify would take an earlier box)
    return anchored_answer(text)


def _math_extract(text: str) -> tuple[list, str | None]:
    """(math-verify parse, answer string) of a prepared completion."""
    answer = _math_answer(text)
    if answer is None or _max_brace_depth(answer) >= MAX_BRACE_DEPTH:  # the box adds one level
        return [], answer
    return math_verify.parse(f"\\boxed{{{answer}}}", extraction_config=_PRED_CONFIG, parsing_timeout=None), answer


def _grade_math(completion: str, gold_answer: str) -> tuple[bool, str | None]:
    parsed, extracted = _math_extract(prepare_completion(completion))
    gold = _parse_gold(_sanitize(gold_answer)) if parsed else ()
    ok = bool(gold) and bool(math_verify.verify(list(gold), parsed, timeout_seconds=None))
    return ok, _clip(extracted)


def grade_math(completion_text: str, gold_answer: str, *, timeout: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Whether the completion's final answer is mathematically equal to ``gold_answer``; False after
    ``timeout`` seconds (see ``grade`` for the details and to tell a timeout from a wrong answer).

    Thinking is stripped; the last ``\\boxed{}`` (else ``anchored_answer``: "The answer is 1/2") is parsed and
    compared with ``math_verify.verify``. The gold may be plain ("1/2", "\\frac{\\sqrt{3}}{2}", "(-\\infty, 2]"),
    boxed or in ``$...$``.
    """
    return grade("math", completion_text, gold_answer, timeout=timeout).correct


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
    the text unless it ``ends_in_loop``. Commas are thousands separators; "$" and a trailing "." are ignored.
    """
    text = _sanitize(text)
    for source in (last_boxed_content(text), None if ends_in_loop(text) else text):
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


def grade_gsm8k(completion: str, gold: str, *, timeout: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Whether the final number equals the gold number (a bare number or "... #### 42"); False after
    ``timeout`` seconds (see ``grade``)."""
    return grade("gsm8k", completion, gold, timeout=timeout).correct


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
    "Answer: C" / "answer is (C)", then the last "(C)", then the last standalone capital A-D; only the box
    when the text ``ends_in_loop``.
    """
    text = _sanitize(text)
    m = _CHOICE_BOXED_RE.match(last_boxed_content(text) or "")
    if m:
        return m.group(1)
    if ends_in_loop(text):
        return None
    for pattern in _CHOICE_RES:
        found = pattern.findall(text)
        if found:
            return found[-1]
    return None


def _grade_choice(completion: str, gold_letter: str) -> tuple[bool, str | None]:
    pred = extract_choice_letter(prepare_completion(completion))
    ref = extract_choice_letter(_sanitize(gold_letter).strip().upper())
    return pred is not None and pred == ref, pred


def grade_choice(completion: str, gold_letter: str, *, timeout: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Whether the completion picks ``gold_letter`` ("C" or "(C)", case-insensitive); False after
    ``timeout`` seconds (see ``grade``)."""
    return grade("choice", completion, gold_letter, timeout=timeout).correct


# ----------------------------------------------------------------------------- dispatch
_GRADERS = {"math": _grade_math, "gsm8k": _grade_gsm8k, "choice": _grade_choice}


def _check_kind(kind: str) -> None:
    if kind not in _GRADERS:
        raise ValueError(f"unknown grading kind {kind!r}; expected one of {KINDS}")


def extracted_answer(kind: str, completion: str) -> str | None:
    """The answer string the ``kind`` grader extracts (for per-sample logs; no gold needed).

    "math": the last boxed content, else ``anchored_answer``; "gsm8k": the canonical
    number; "choice": the letter. Clipped to ``MAX_EXTRACTED_CHARS``.
    """
    _check_kind(kind)
    text = prepare_completion(completion)
    if kind == "math":
        return _clip(_math_answer(text))
    return _clip(extract_last_number(text) if kind == "gsm8k" else extract_choice_letter(text))


def grade(kind: str, completion: str, gold: str, *, timeout: float | None = DEFAULT_TIMEOUT_S) -> GradeResult:
    """Grades one item within ``timeout`` seconds: ``GradeResult(correct, timed_out, extracted, error)``.

    ``kind``: "math", "gsm8k" or "choice". The grader runs in a persistent worker process shared by every
    call of this process (``grading_pool.shared_grade``), killed and replaced when an item runs past
    ``timeout``: such an item comes back ``correct=False, timed_out=True``. A call costs about a
    millisecond more than grading in-process; the first call, and the first after a timeout, also waits
    for the worker to start (about a second: a fresh interpreter importing sympy). ``timeout=None`` grades
    in this process without a bound (``grade_one``). Thread-safe (calls take turns); for batches,
    ``GradingPool`` grades in parallel.
    """
    _check_kind(kind)
    if timeout is None:
        return grade_one(kind, completion, gold)
    from motab_jax.eval.grading_pool import shared_grade  # the workers load this file without the package

    return shared_grade(kind, completion, gold, timeout)


def grade_one(kind: str, completion: str, gold: str) -> GradeResult:
    """Grades one item in this process WITHOUT a time limit (what each worker runs; ``grade`` bounds it).

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


def __getattr__(name: str) -> Any:
    # GradingPool lives in grading_pool.py (it imports this file); kept importable from here.
    if name == "GradingPool":
        from motab_jax.eval.grading_pool import GradingPool

        return GradingPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
