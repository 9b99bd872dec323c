"""How big the text-level (cross-vocabulary) engine's KV caches are: one rule for the engine and the preflight.

The text path gives every slot pages for its whole capacity in both models' pools (no admission by pages yet):

    student_len = bucket(max_prompt_len) + traj_cap + 2
    teacher_len = ceil(r * student_len) + max(teacher_min_budget, traj_cap)

r is the teacher/student token ratio the teacher's context is sized for: teacher tokens per student token,
measured with both tokenizers on the job's first questions' reference solutions (a `solution` field), or, when the
questions carry none, on a bundled sample of MATH-500 reference solutions (text like the reasoning the student
writes). The worst text of the sample sets r (never below the sample's pooled ratio), since a trajectory's ratio
varies with its content (digits, LaTeX). A trajectory whose teacher encoding still outgrows `teacher_len` ends
there (finish "length"; the engine logs how many did). Measured on MATH-500 (first 32 / all 500 solutions,
pooled and worst): o200k/Qwen 0.965 / 0.963, worst 1.05 / 1.11; Qwen/Llama 3 1.050 / 1.046, worst 1.21 / 1.40.

Slots: those whose full-capacity caches fit what the weights leave, less `pool.WORKSPACE_FRACTION`; with
`memory_budget_gb` set, that budget (weights included) decides. Over G engine groups (the mesh's `data` axis) each
group holds a copy of the weights and num_slots / G slots (rounded up) if they fit its share of the memory. Not even one slot is a MemoryError (the preflight
reports it before any weights load).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from motab_jax.models.config import ModelConfig
from motab_jax.models.paged_cache import kv_bytes_per_token
from motab_jax.motab.pool import GIB, WORKSPACE_FRACTION, pages_for
from motab_jax.sampling.sampler import bucket

RATIO_TEXTS = 32  # how many texts the ratio is measured on (~0.2 s with both tokenizers)
# Texts shorter than this (student tokens) do not set the worst case: a handful of tokens gives noisy ratios.
RATIO_MIN_TOKENS = 32
_BUNDLED = Path(__file__).resolve().parents[1] / "eval" / "data" / "math500.jsonl"
BUNDLED_SOURCE = "the first MATH-500 reference solutions (bundled)"


@dataclasses.dataclass(frozen=True)
class TokenRatio:
    """Teacher tokens per student token on a sample of text."""

    pooled: float  # over the whole sample
    worst: float  # of the one text with the highest ratio (among those of RATIO_MIN_TOKENS or more)
    texts: int
    source: str

    @property
    def for_caches(self) -> float:
        """The ratio the teacher's caches are sized for."""
        return max(self.worst, self.pooled)

    def describe(self) -> str:
        return (f"teacher/student token ratio {self.pooled:.3f} pooled, {self.worst:.3f} on the worst text, over "
                f"{self.texts} texts ({self.source}); the teacher's caches are sized for {self.for_caches:.3f}")


def ratio_texts(questions: Sequence[Any], n: int = RATIO_TEXTS) -> tuple[str, list[str]]:
    """(where they come from, texts): the `solution` fields of the first `n` questions that have one, else the
    first `n` bundled MATH-500 reference solutions."""
    solutions = [str(q["solution"]) for q in questions[:n] if isinstance(q, Mapping) and q.get("solution")]
    if solutions:
        return f"the reference solutions of the job's first {len(solutions)} questions", solutions
    from motab_jax.jsonl import read_jsonl

    return BUNDLED_SOURCE, [str(row["solution"]) for row in read_jsonl(_BUNDLED)[:n]]


def measure_token_ratio(student_tokenizer: Any, teacher_tokenizer: Any, texts: Sequence[str],
                        source: str) -> TokenRatio:
    """The ratio of the teachers' to the students' token counts of `texts` (each encoded without special tokens)."""
    def count(tokenizer: Any, text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    pairs = [(count(teacher_tokenizer, t), count(student_tokenizer, t)) for t in texts if t]
    if not pairs or not sum(s for _, s in pairs):
        raise ValueError(f"no text to measure the teacher/student token ratio on ({source})")
    pooled = sum(t for t, _ in pairs) / sum(s for _, s in pairs)
    long = [t / s for t, s in pairs if s >= RATIO_MIN_TOKENS] or [t / s for t, s in pairs if s]
    return TokenRatio(pooled, max(long), len(pairs), source)


def cache_lengths(cfg: Mapping[str, Any], ratio: float) -> tuple[int, int]:
    """(student, teacher) positions one slot addresses: the student's prompt and trajectory; the teacher's
    encoding of them (`ratio` teacher tokens per student token) plus its own continuation."""
    student_len = bucket(int(cfg["max_prompt_len"])) + int(cfg["traj_cap"]) + 2
    teacher_len = math.ceil(ratio * student_len) + max(int(cfg["teacher_min_budget"]), int(cfg["traj_cap"]))
    return student_len, teacher_len


@dataclasses.dataclass(frozen=True)
class TextPathPlan:
    """The slots of the text path in each engine group and what sets them."""

    wanted: int  # slots asked for per group (num_slots / groups rounded up, at most the trajectories to run)
    slots: int  # slots per group whose caches fit (0: not even one; the engine refuses)
    student_len: int
    teacher_len: int
    slot_bytes: float  # KV bytes of one slot at full capacity, both models
    free_bytes: float  # what the weights leave on the group
    where: str  # where `free_bytes` comes from
    groups: int = 1

    def describe(self) -> str:
        each = f" in each of {self.groups} engine groups" if self.groups > 1 else ""
        return (f"text-level synthesis runs {self.slots} of {self.wanted} slots{each}: each slot holds "
                f"{self.slot_bytes / GIB:.3g} GiB of KV pages at full capacity (student {self.student_len} + teacher "
                f"{self.teacher_len} positions), and {self.free_bytes / GIB:.3g} GiB{each.replace(' in', ' of')} are "
                f"left after the weights ({self.where}; {WORKSPACE_FRACTION:.0%} kept for XLA's workspace)")

    def refusal(self) -> str:
        return (f"text-level synthesis needs {self.slot_bytes / GIB:.3g} GiB of KV pages per slot (student "
                f"{self.student_len} + teacher {self.teacher_len} positions at full capacity) but {self.where} leaves "
                f"{self.free_bytes / GIB:.3g} GiB after the weights; lower synthesis.traj_cap or max_prompt_len, or "
                "use more devices")


def slot_bytes(cfg: Mapping[str, Any], student: ModelConfig, teacher: ModelConfig, ratio: float
               ) -> tuple[int, int, float]:
    """(student positions, teacher positions, KV bytes) of one slot at full capacity, each model's pool in its
    compute dtype."""
    page = int(cfg["page_size"])
    student_len, teacher_len = cache_lengths(cfg, ratio)
    per_slot = float(sum(pages_for(length, page) * page * kv_bytes_per_token(m.num_layers, m.num_kv_heads,
                                                                             m.head_dim, m.compute_dtype)
                         for m, length in ((student, student_len), (teacher, teacher_len))))
    return student_len, teacher_len, per_slot


def plan_text_path(cfg: Mapping[str, Any], student: ModelConfig, teacher: ModelConfig, ratio: float, *, wanted: int,
                   free_bytes: float, where: str, groups: int = 1) -> TextPathPlan:
    """The slots (of `wanted`) whose full-capacity caches fit `free_bytes` (one group's), less the workspace
    fraction."""
    student_len, teacher_len, per_slot = slot_bytes(cfg, student, teacher, ratio)
    fit = max(int(free_bytes * (1 - WORKSPACE_FRACTION) // per_slot), 0)
    return TextPathPlan(wanted, min(wanted, fit), student_len, teacher_len, per_slot, free_bytes, where, groups)
