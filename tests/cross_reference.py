"""A plain, one-trajectory-at-a-time reference of synthesis with a teacher of another tokenizer (greedy).

Written at the text level like the authors' scripts: the context is text; every step the teacher tokenizes the
whole context and context + step from scratch (`tokenizer.encode`, no incremental encoding), scores the step
with a full forward pass and takes the entropy from another; models run full causal passes (no KV cache, no
automaton: a step ends when its bytes contain the delimiter). Shares no code with the engine.
"""

from __future__ import annotations

import codecs
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from motab_reference import topk_entropy


class _Forward:
    """Full causal passes over right-padded ids (width: the next power of two), reading back only what is used:
    the next-token logits, or the log-probability of every id given the ones before it."""

    def __init__(self, model):
        self.model = model
        self._last = jax.jit(lambda m, x, n: jax.lax.dynamic_index_in_dim(m(x)[0], n - 1, keepdims=False))
        self._logps = jax.jit(lambda m, x: jnp.take_along_axis(
            jax.nn.log_softmax(m(x)[0, :-1].astype(jnp.float32)), x[0, 1:, None], axis=-1)[:, 0])

    @staticmethod
    def _padded(ids: list[int]) -> jax.Array:
        width = 1 << max(len(ids) - 1, 1).bit_length()
        x = np.zeros((1, max(width, 64)), np.int32)
        x[0, :len(ids)] = ids
        return jnp.asarray(x)

    def next_logits(self, ids: list[int]) -> np.ndarray:
        return np.asarray(self._last(self.model, self._padded(ids), len(ids))).astype(np.float64)

    def logps(self, ids: list[int]) -> np.ndarray:
        """[len(ids) - 1]: log p(ids[i + 1] | ids[:i + 1])."""
        return np.asarray(self._logps(self.model, self._padded(ids)))[:len(ids) - 1].astype(np.float64)


@dataclasses.dataclass
class CrossSettings:
    delimiter: str
    student_eos: tuple[int, ...]
    teacher_eos: tuple[int, ...]
    step_cap: int
    traj_cap: int
    teacher_min_budget: int
    max_steps: int
    entropy_top_k: int = 20


def _complete_text(data: bytes) -> str:
    """The characters of `data` whose bytes are complete (an incomplete last character is left out)."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data, final=False)


_ALPHABET = None


def _bytes(tokenizer, ids: list[int]) -> bytes:
    """The text bytes of `ids` as a server's detokenizer gives them: special tokens skipped, added ones as their
    content, byte-level tokens through GPT-2's byte alphabet."""
    global _ALPHABET
    if _ALPHABET is None:
        from motab_jax.text.qwen import bytes_to_unicode

        _ALPHABET = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    added = tokenizer.added_tokens_decoder
    out = b""
    for i, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if i in special:
            continue
        out += added[i].content.encode() if i in added else bytes(_ALPHABET[c] for c in token)
    return out


@dataclasses.dataclass
class _Context:
    fixed: str  # text that no longer changes
    run: bytes = b""  # student bytes since then, decoded as one stream

    @property
    def text(self) -> str:
        return self.fixed + _complete_text(self.run)


def cross_reference(student, teacher, s_tok, t_tok, student_prompt: list[int], teacher_prompt: str, s: CrossSettings,
                    *, policy: str, eps0: float = 0.2, theta: float = 1.0, gamma: float = 0.9,
                    first_token_unscored: bool = False, entropy_zero: bool = False) -> dict:
    """steps [(source, V_T or None, eps, H)], breach_step, root_step, finish, record_student_ids (the student's ids
    in the record, in order), teacher_ids (every id the teacher wrote, in order)."""
    fs, ft = _Forward(student), _Forward(teacher)
    backtrack = policy in ("motab", "motab_no_stitch")
    stitch = policy in ("motab", "motab_no_backtrack", "motab_no_adaptive")
    one_step = policy == "skd_step"
    theta = 0.0 if policy == "motab_no_adaptive" else theta
    ids = list(student_prompt)
    prompt_len = len(ids)
    ctx = _Context(teacher_prompt)
    steps: list[dict] = []
    out = {"breach_step": None, "root_step": None, "teacher_ids": []}
    delim = s.delimiter.encode()

    def teacher_entropy(text: str) -> float:
        return topk_entropy(ft.next_logits(t_tok.encode(text, add_special_tokens=False)), s.entropy_top_k)

    def teacher_writes(text: str, budget: int) -> tuple[list[int], str]:
        context = t_tok.encode(text, add_special_tokens=False)
        written: list[int] = []
        while True:
            token = int(np.argmax(ft.next_logits(context + written)))
            written.append(token)
            if token in s.teacher_eos:
                return written, "eos"
            if one_step and (delim in _bytes(t_tok, written) or len(written) >= s.step_cap):
                return written, "step"
            if len(written) >= budget:
                return written, "teacher_budget"

    if policy == "teacher_only":
        written, why = teacher_writes(ctx.text, s.traj_cap)
        return {**out, "steps": [], "finish": why, "record_student_ids": [], "teacher_ids": written}
    while True:
        start_text, start_ids = ctx.text, len(ids)
        step: list[int] = []
        while True:  # one student step
            token = int(np.argmax(fs.next_logits(ids + step)))
            step.append(token)
            if (delim in _bytes(s_tok, step) or token in s.student_eos or len(step) >= s.step_cap
                    or len(ids) + len(step) - prompt_len >= s.traj_cap):
                break
        v_student = float(np.exp(np.mean(fs.logps(ids + step)[len(ids) - 1:])))
        before = t_tok.encode(ctx.text, add_special_tokens=False)
        h = 0.0 if entropy_zero else teacher_entropy(ctx.text)
        ctx.run += _bytes(s_tok, step)
        joint = t_tok.encode(ctx.text, add_special_tokens=False)
        scored = ft.logps(joint)[len(before) - 1 + int(first_token_unscored):]
        value = float(np.exp(np.mean(scored))) if len(scored) else (0.0 if first_token_unscored else 1.0)
        eps = eps0 * float(np.exp(-theta * h)) if policy != "skd_step" else 0.0
        accept = value >= eps if policy != "skd_step" else value > gamma * v_student
        ids += step
        steps.append({"source": "student", "value": value, "eps": eps, "h": h, "ids": step, "kept": accept,
                      "start_text": start_text, "start_ids": start_ids})
        if accept:
            if step[-1] in s.student_eos:
                finish = "eos"
            elif len(ids) - prompt_len >= s.traj_cap:
                finish = "length"
            elif len(steps) >= s.max_steps:
                finish = "max_steps"
            else:
                continue
            break
        t = len(steps)
        values = [st["value"] for st in steps]
        t_star = t
        if backtrack and t > 1:
            deltas = [values[k] - values[k - 1] for k in range(1, t)]
            t_star = 2 + int(np.argmin(deltas))
        if out["breach_step"] is None:
            out["breach_step"], out["root_step"] = t, t_star
            out["safe"] = sum(len(st["ids"]) for st in steps[:t_star - 1])
        safe_step = steps[t_star - 1]
        ids = ids[:safe_step["start_ids"]]
        ctx = _Context(safe_step["start_text"])
        budget = max(s.teacher_min_budget, s.traj_cap - (safe_step["start_ids"] - prompt_len))
        written, why = teacher_writes(ctx.text, budget)
        out["teacher_ids"] += written
        if why == "step":
            text = t_tok.decode(written, skip_special_tokens=True)
            student_ids = s_tok.encode(text, add_special_tokens=False)
            steps.append({"source": "teacher", "value": None, "eps": 0.0, "h": 0.0, "ids": student_ids, "kept": True})
            ids += student_ids
            ctx = _Context(ctx.text + text)
            if len(steps) >= s.max_steps:
                finish = "max_steps"
                break
            continue
        finish = why
        break
    if one_step or out["breach_step"] is None:
        record = [st for st in steps if st["kept"]]
    else:
        record = steps[:out["breach_step"]] if stitch else steps[:out["root_step"] - 1]
    return {**out, "finish": finish, "steps": [(st["source"], st["value"], st["eps"], st["h"]) for st in steps],
            "record_student_ids": [t for st in record if st["source"] == "student" for t in st["ids"]]}
