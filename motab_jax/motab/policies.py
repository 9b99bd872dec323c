"""Synthesis policies as small strategy objects plugged into one engine loop.

A policy answers four questions, all with pure array functions over the slot batch:
- `needs_teacher`: does exploration need the teacher forward at all (student-only does not);
- `starts_with_teacher`: does the teacher write from the prompt (teacher-only);
- `judge(v_teacher, v_student, eps)`: is a finished student step kept;
- what happens on a rejected step (`on_reject`): where to rewind (root cause or the step itself), whether
  the teacher then writes the rest ("until_end") or one step ("one_step"), and whether the flawed steps
  stay in the record (stitching) or are dropped;
- `token_cut(in_top_k)`: for token-level policies, the first drafted token the teacher replaces.
Adding a policy never touches the loop.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str = "base"
    needs_teacher: bool = True
    starts_with_teacher: bool = False
    # On a rejected step: rewind to the root-cause step (MOTAB) or to the rejected step itself.
    backtrack: bool = False
    teacher_writes: Literal["until_end", "one_step"] = "until_end"
    # The record keeps the rejected steps before REVISE + teacher text (MOTAB stitching); False: the record
    # is the safe prefix + teacher text (SKD's rewrite, MOTAB's no-stitching ablation).
    stitch: bool = True
    token_top_k: int = 0  # > 0: token-level SKD (drafted tokens outside the teacher's top-K are replaced)
    # Random keys per token position (fold_in(trajectory key, token index)) instead of per iteration: plain
    # generation draws exactly the keys of the static sampler (`sampling.sampler.sample_batch`).
    keys_by_position: bool = False

    def boundary(self, entropy: jax.Array) -> jax.Array:
        """The step's safety boundary eps (0 for policies without one)."""
        return jnp.zeros_like(entropy)

    def judge(self, v_teacher: jax.Array, v_student: jax.Array, eps: jax.Array) -> jax.Array:
        """True where a finished step is accepted."""
        return jnp.ones_like(v_teacher, bool)

    @property
    def judges_steps(self) -> bool:
        """Whether finished student steps can be rejected (so a breach rate means something)."""
        return type(self).judge is not Policy.judge


@dataclasses.dataclass(frozen=True)
class Motab(Policy):
    """Spec section 3: adaptive boundary eps0 * exp(-theta * H), root-cause backtracking, stitching.

    Ablations: theta = 0 (no adaptive boundary), backtrack=False (t* = t), stitch=False (safe prefix +
    teacher text only).
    """

    name: str = "motab"
    eps0: float = 0.2
    theta: float = 1.0
    backtrack: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.eps0 <= 1:
            raise ValueError(f"eps0={self.eps0} must be in (0, 1]")
        if self.theta < 0:
            raise ValueError(f"theta={self.theta} must be >= 0")

    def boundary(self, entropy: jax.Array) -> jax.Array:
        return self.eps0 * jnp.exp(-self.theta * entropy)

    def judge(self, v_teacher: jax.Array, v_student: jax.Array, eps: jax.Array) -> jax.Array:
        return v_teacher >= eps


@dataclasses.dataclass(frozen=True)
class SkdStep(Policy):
    """Step-level SKD: keep a step if pbar_T > gamma * pbar_S, else the teacher rewrites that one step."""

    name: str = "skd_step"
    gamma: float = 0.9
    teacher_writes: Literal["until_end", "one_step"] = "one_step"
    stitch: bool = False

    def judge(self, v_teacher: jax.Array, v_student: jax.Array, eps: jax.Array) -> jax.Array:
        return v_teacher > self.gamma * v_student


@dataclasses.dataclass(frozen=True)
class SkdToken(Policy):
    """Token-level SKD (Xu et al. 2025): a drafted token outside the teacher's top-K is replaced by a
    teacher sample and the rest of the chunk is discarded."""

    name: str = "skd_token"
    token_top_k: int = 25


@dataclasses.dataclass(frozen=True)
class StudentOnly(Policy):
    name: str = "student_only"
    needs_teacher: bool = False


@dataclasses.dataclass(frozen=True)
class Plain(Policy):
    """Plain sampling from the student (evaluation, on-policy rollouts, `generate`): no teacher, no steps."""

    name: str = "plain"
    needs_teacher: bool = False
    keys_by_position: bool = True


@dataclasses.dataclass(frozen=True)
class TeacherOnly(Policy):
    name: str = "teacher_only"
    starts_with_teacher: bool = True


POLICY_NAMES = ("motab", "motab_no_adaptive", "motab_no_backtrack", "motab_no_stitch", "skd_step", "skd_token",
                "student_only", "teacher_only")


def make_policy(name: str, **params: float | bool) -> Policy:
    """A policy by config name: motab (eps0, theta, backtrack, stitch), skd_step (gamma), skd_token (top_k),
    student_only, teacher_only, and the ablations motab_no_adaptive / motab_no_backtrack / motab_no_stitch."""
    ablations = {"motab_no_adaptive": dict(theta=0.0), "motab_no_backtrack": dict(backtrack=False),
                 "motab_no_stitch": dict(stitch=False)}
    if name in ablations:
        return Motab(**{**{k: v for k, v in params.items() if k in ("eps0", "theta")}, **ablations[name]})
    if name == "motab":
        return Motab(**{k: v for k, v in params.items() if k in ("eps0", "theta", "backtrack", "stitch")})
    if name == "skd_step":
        return SkdStep(**{k: v for k, v in params.items() if k == "gamma"})
    if name == "skd_token":
        return SkdToken(token_top_k=int(params.get("token_top_k", 25)))
    if name == "student_only":
        return StudentOnly()
    if name == "teacher_only":
        return TeacherOnly()
    raise ValueError(f"policy={name!r}; accepted: {', '.join(POLICY_NAMES)}")

