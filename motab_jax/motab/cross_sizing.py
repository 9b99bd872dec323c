"""How big the text-level (cross-vocabulary) engine's KV page pools are: one rule for the engine and the preflight.

A slot addresses the positions of its whole capacity in each model's cache:

    student_len = bucket(max_prompt_len) + traj_cap + 2
    teacher_len = ceil(r * student_len) + max(teacher_min_budget, traj_cap)

r is the teacher/student token ratio the teacher's context is sized for: teacher tokens per student token,
measured with both tokenizers on the job's first questions' reference solutions (a `solution` field), or, when the
questions carry none, on a bundled sample of MATH-500 reference solutions (text like the reasoning the student
writes). The worst text of the sample sets r (never below the sample's pooled ratio), since a trajectory's ratio
varies with its content (digits, LaTeX). A trajectory whose teacher encoding still outgrows `teacher_len` ends
there (finish "length"; the engine logs how many did). Measured on MATH-500 (first 32 / all 500 solutions,
pooled and worst): o200k/Qwen 0.965 / 0.963, worst 1.05 / 1.11; Qwen/Llama 3 1.050 / 1.046, worst 1.21 / 1.40.

Only the pages of live tokens are held (`cross_pages`: admission by free pages, preemption), so the pools are sized
by memory, not by slots x capacity, as on the token path (`pool`), one pool per model (the student's holds student
tokens, the teacher's teacher tokens):
- `num_pages` > 0: that many pages in each model's pool of each engine group;
- otherwise what the weights leave of `memory_budget_gb` (weights included) when set, else of the free device
  memory, less `pool.WORKSPACE_FRACTION`, split between the two pools in the proportion of one slot's full-capacity
  caches (so both pools hold the same share of every slot's capacity); never more than every slot at full capacity.
Over G engine groups (the mesh's `data` axis) each group holds a copy of the weights, num_slots / G slots (rounded
up) and its own pools from its share of the memory. Refused (the preflight reports it before any weights load; the
engine raises MemoryError), as on the token path: a pool that cannot hold one trajectory at full capacity plus
every other slot's prompt. Above that every slot runs; when the live tokens outgrow a pool the engine preempts the
most recently started trajectory and reruns it later (same record), so a small pool costs time, never records.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from motab_jax.models.config import ModelConfig
from motab_jax.models.paged_cache import kv_bytes_per_token
from motab_jax.motab.pool import GIB, WORKSPACE_FRACTION, min_pool_pages, pages_for
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
    """The slots and page pools of the text path in each engine group and what sets them."""

    wanted: int  # slots asked for per group (num_slots / groups rounded up, at most the trajectories to run)
    slots: int  # slots per group it runs: `wanted`, or 0 when a pool cannot hold the least (the engine refuses)
    student_len: int  # positions one slot addresses in the student's cache
    teacher_len: int
    slot_bytes: float  # KV bytes of one slot at full capacity, both models
    free_bytes: float  # what the weights leave on the group (0 when num_pages was given)
    where: str  # where `free_bytes` (or the page count) comes from
    groups: int = 1
    page_size: int = 16
    student_pages: int = 0  # pages of the student's pool in each group, the null page included
    teacher_pages: int = 0
    student_min: int = 0  # the least pages each pool needs: one trajectory at full capacity, the other prompts, null
    teacher_min: int = 0
    student_page_bytes: int = 0  # KV bytes of one page of each model
    teacher_page_bytes: int = 0

    @property
    def pool_bytes(self) -> float:
        """KV bytes of both pools of one group."""
        return float(self.student_pages * self.student_page_bytes + self.teacher_pages * self.teacher_page_bytes)

    @property
    def min_bytes(self) -> float:
        return float(self.student_min * self.student_page_bytes + self.teacher_min * self.teacher_page_bytes)

    @property
    def capacity_share(self) -> float:
        """The share of every slot's full-capacity caches the pools hold when all slots are busy (1: no preemption
        can happen); past it the engine preempts."""
        return min(self.pool_bytes / (self.wanted * self.slot_bytes), 1.0) if self.wanted else 1.0

    def describe(self) -> str:
        each = f" in each of {self.groups} engine groups" if self.groups > 1 else ""
        return (f"text-level synthesis runs {self.slots} of {self.wanted} slots{each}: each slot holds "
                f"{self.slot_bytes / GIB:.3g} GiB of KV pages at full capacity (student {self.student_len} + teacher "
                f"{self.teacher_len} positions); the pools hold {self.student_pages} student + {self.teacher_pages} "
                f"teacher pages of {self.page_size} positions{each.replace(' in', ' of')} "
                f"({self.pool_bytes / GIB:.3g} GiB, {self.capacity_share:.0%} of every slot at full capacity; past that "
                f"the engine preempts) from {self._source()}")

    def refusal(self) -> str:
        each = f" in each of {self.groups} engine groups" if self.groups > 1 else ""
        return (f"text-level synthesis needs {self.slot_bytes / GIB:.3g} GiB of KV pages per slot (student "
                f"{self.student_len} + teacher {self.teacher_len} positions) for one trajectory at full capacity, plus "
                f"the prompts of the {self.wanted - 1} other slots{each}: at least {self.student_min} student + "
                f"{self.teacher_min} teacher pages of {self.page_size} positions ({self.min_bytes / GIB:.3g} GiB), but "
                f"the pools get {self.student_pages} + {self.teacher_pages} pages ({self.pool_bytes / GIB:.3g} GiB "
                f"from {self._source()}); raise synthesis.memory_budget_gb or num_pages, or lower num_slots, traj_cap or "
                "max_prompt_len, or use more devices")

    def _source(self) -> str:
        if not self.free_bytes and self.where.startswith("num_pages="):
            return self.where
        return (f"{self.free_bytes / GIB:.3g} GiB left after the weights ({self.where}; {WORKSPACE_FRACTION:.0%} "
                "kept for XLA's workspace)")


def slot_bytes(cfg: Mapping[str, Any], student: ModelConfig, teacher: ModelConfig, ratio: float
               ) -> tuple[int, int, float]:
    """(student positions, teacher positions, KV bytes) of one slot at full capacity, each model's pool in its
    compute dtype."""
    page = int(cfg["page_size"])
    student_len, teacher_len = cache_lengths(cfg, ratio)
    per_slot = float(sum(pages_for(length, page) * _page_bytes(m, page)
                         for m, length in ((student, student_len), (teacher, teacher_len))))
    return student_len, teacher_len, per_slot


def _page_bytes(model: ModelConfig, page_size: int) -> int:
    return page_size * kv_bytes_per_token(model.num_layers, model.num_kv_heads, model.head_dim, model.compute_dtype)


def plan_text_path(cfg: Mapping[str, Any], student: ModelConfig, teacher: ModelConfig, ratio: float, *, wanted: int,
                   free_bytes: float, where: str, groups: int = 1) -> TextPathPlan:
    """Both pools of one group for `wanted` slots (see the module docstring for the rule): `num_pages` each when
    set, else from `free_bytes` (what the weights leave on one group) less the workspace fraction."""
    page = int(cfg["page_size"])
    student_len, teacher_len, per_slot = slot_bytes(cfg, student, teacher, ratio)
    per_seq = {"student": pages_for(student_len, page), "teacher": pages_for(teacher_len, page)}
    # The teacher's prompt is the same question in its tokens (its own template aside): the ratio's share.
    prompt = {"student": int(cfg["max_prompt_len"]), "teacher": math.ceil(ratio * int(cfg["max_prompt_len"]))}
    length = {"student": student_len, "teacher": teacher_len}
    least = {k: min_pool_pages(length[k], prompt[k], wanted, page) for k in per_seq}
    if int(cfg.get("num_pages") or 0):
        pages = {k: int(cfg["num_pages"]) for k in per_seq}
        free_bytes, where = 0.0, f"num_pages={int(cfg['num_pages'])}"
    else:
        # Both pools get the same share of every slot's full capacity: the budget over one slot's bytes, in slots.
        share = max(free_bytes, 0.0) * (1 - WORKSPACE_FRACTION) / per_slot
        pages = {k: min(wanted * per_seq[k] + 1, int(share * per_seq[k])) for k in per_seq}
    fits = all(pages[k] >= least[k] for k in per_seq)
    return TextPathPlan(wanted, wanted if fits else 0, student_len, teacher_len, per_slot, free_bytes, where, groups,
                        page, pages["student"], pages["teacher"], least["student"], least["teacher"],
                        _page_bytes(student, page), _page_bytes(teacher, page))
