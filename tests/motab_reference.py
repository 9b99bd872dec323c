"""A plain, one-trajectory-at-a-time reference of spec section 3 and its baselines, for the engine tests.

Written like the authors' scripts, at the text level and step by step: the student generates one step
(greedy, full forward each token, the step ends when its decoded text contains the delimiter), the
teacher scores it with a prefill, the entropy comes from another prefill, then decide. It shares no code
with the engine (no KV cache, no automaton, no chunking).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Settings:
    delimiter: str
    eos: tuple[int, ...]
    step_cap: int
    traj_cap: int
    teacher_min_budget: int
    entropy_top_k: int = 20
    revise: str = "However,"


class Forward:
    """Last-position (or all-position) logits of a model for a token list, through a full causal pass."""

    def __init__(self, model, width: int = 256):
        self.model, self.width = model, width
        self.fn = jax.jit(lambda m, x: m(x))

    def logits(self, ids: list[int]) -> np.ndarray:
        padded = np.zeros((1, self.width), np.int32)  # causal: right padding is never seen
        padded[0, :len(ids)] = ids
        return np.asarray(self.fn(self.model, jnp.asarray(padded)))[0, :len(ids)].astype(np.float64)

    def next_logits(self, ids: list[int]) -> np.ndarray:
        return self.logits(ids)[-1]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def topk_entropy(logits: np.ndarray, k: int) -> float:
    top = np.sort(logits)[-k:]
    logp = log_softmax(top)
    return float(-(np.exp(logp) * logp).sum())


def _student_step(student: Forward, tokenizer, ctx: list[int], generated: int, s: Settings) -> list[int]:
    step: list[int] = []
    while True:
        token = int(np.argmax(student.next_logits(ctx + step)))
        step.append(token)
        text = tokenizer.decode(step)
        if (s.delimiter in text or token in s.eos or len(step) >= s.step_cap
                or generated + len(step) >= s.traj_cap):
            return step


def _teacher_tokens(teacher: Forward, ctx: list[int], budget: int, s: Settings, tokenizer=None,
                    one_step: bool = False) -> tuple[list[int], str]:
    out: list[int] = []
    while True:
        token = int(np.argmax(teacher.next_logits(ctx + out)))
        out.append(token)
        if token in s.eos:
            return out, "eos"
        if len(out) >= budget:
            return out, "teacher_budget"
        if one_step and (s.delimiter in tokenizer.decode(out) or len(out) >= s.step_cap):
            return out, "step"


def _score(teacher: Forward, ctx: list[int], step: list[int]) -> float:
    logits = teacher.logits(ctx + step)
    logp = log_softmax(logits)
    return float(np.mean([logp[len(ctx) - 1 + i, t] for i, t in enumerate(step)]))


def motab(student: Forward, teacher: Forward, tokenizer, prompt: list[int], s: Settings, eps0: float, theta: float,
          backtrack: bool = True) -> dict:
    ctx, steps, values, boundaries, entropies = list(prompt), [], [], [], []
    generated = 0
    while True:
        entropy = topk_entropy(teacher.next_logits(ctx), s.entropy_top_k)  # second prefill: H(s_{t-1})
        step = _student_step(student, tokenizer, ctx, generated, s)
        value = math.exp(_score(teacher, ctx, step))  # first prefill: V_T(s_{t-1}, a_t)
        eps = eps0 * math.exp(-theta * entropy)
        steps.append(step), values.append(value), boundaries.append(eps), entropies.append(entropy)
        generated += len(step)
        if value >= eps:
            ctx += step
            if step[-1] in s.eos or generated >= s.traj_cap:
                finish = "eos" if step[-1] in s.eos else "length"
                return dict(steps=steps, values=values, eps=boundaries, entropy=entropies, breach=None, root=None,
                            teacher=[], finish=finish)
            continue
        t = len(steps)
        if t == 1 or not backtrack:
            t_star = t
        else:
            deltas = [values[k] - values[k - 1] for k in range(1, t)]  # delta for steps 2..t
            t_star = 2 + int(np.argmin(deltas))
        safe = [tok for st in steps[:t_star - 1] for tok in st]
        budget = max(s.teacher_min_budget, s.traj_cap - len(safe))
        teacher_out, finish = _teacher_tokens(teacher, list(prompt) + safe, budget, s)
        return dict(steps=steps, values=values, eps=boundaries, entropy=entropies, breach=t, root=t_star,
                    teacher=teacher_out, finish=finish, safe=len(safe))


def skd_step(student: Forward, teacher: Forward, tokenizer, prompt: list[int], s: Settings, gamma: float) -> dict:
    ctx, record = list(prompt), []
    interventions = 0
    while True:
        generated = len(ctx) - len(prompt)
        step = _student_step(student, tokenizer, ctx, generated, s)
        p_teacher = math.exp(_score(teacher, ctx, step))
        p_student = math.exp(_score(student, ctx, step))
        if p_teacher > gamma * p_student:
            ctx += step
            record += [("student", t) for t in step]
            if step[-1] in s.eos or len(ctx) - len(prompt) >= s.traj_cap:
                return dict(tokens=record, interventions=interventions)
            continue
        interventions += 1
        budget = max(s.teacher_min_budget, s.traj_cap - generated)
        rewrite, finish = _teacher_tokens(teacher, ctx, budget, s, tokenizer, one_step=True)
        ctx += rewrite
        record += [("teacher", t) for t in rewrite]
        if finish != "step":
            return dict(tokens=record, interventions=interventions)


def teacher_only(teacher: Forward, prompt: list[int], s: Settings) -> list[int]:
    return _teacher_tokens(teacher, list(prompt), s.traj_cap, s)[0]
