"""Turning a finished slot into an SFT record.

Every synthesis record keeps the prompt each model saw: ``prompt``, the text the student was conditioned on (SFT
trains the student on it), and ``teacher_prompt``, the text the teacher was conditioned on. With one vocabulary
both models read one token sequence, rendered by the teacher's tokenizer (its chat template), so the two are
equal; across vocabularies (``cross_records``) each is its own model's rendering. The preflight compares the
student's own rendering with the teacher's (``pipeline.prompt_check``): evaluation prompts the student with its own.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from motab_jax.jsonl import read_records
from motab_jax.motab.state import FINISH_NAMES, SRC_STUDENT, SRC_TEACHER


def _segments(tokenizer: Any, tokens: np.ndarray, sources: np.ndarray) -> list[dict[str, Any]]:
    """Consecutive runs of one provenance, decoded."""
    out: list[dict[str, Any]] = []
    start = 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or sources[i] != sources[start]:
            name = "student" if sources[start] == SRC_STUDENT else "teacher"
            ids = tokens[start:i].tolist()
            out.append({"source": name, "num_tokens": i - start, "token_ids": ids,
                        "text": tokenizer.decode(ids, skip_special_tokens=True)})
            start = i
    return out


def build_record(tokenizer: Any, slot: dict[str, np.ndarray], *, question_id: str, sample_index: int,
                 prompt: str, policy_name: str, stitched: bool, revise: str) -> dict[str, Any]:
    """The record of one finished trajectory; `slot` holds that slot's row of every state array; `prompt` is the
    text both models were prompted with (the teacher tokenizer's rendering)."""
    length = int(slot["out_len"])
    tokens, sources = slot["out_tokens"][:length], slot["out_src"][:length]
    breach, explore_len = int(slot["breach_step"]), int(slot["explore_len"])
    if stitched and breach:
        # Spec eq. 11: steps 1..t (all student steps, the flawed ones too) + "\n\n" + REVISE + "\n\n" + teacher.
        segments = _segments(tokenizer, tokens[:explore_len], sources[:explore_len])
        revise_ids = tokenizer(f"\n\n{revise}\n\n", add_special_tokens=False)["input_ids"]
        segments.append({"source": "revise", "num_tokens": len(revise_ids), "token_ids": revise_ids,
                         "text": f"\n\n{revise}\n\n"})
        segments += _segments(tokenizer, tokens[explore_len:], sources[explore_len:])
    else:
        segments = _segments(tokenizer, tokens, sources)
    num_steps = int(slot["num_steps"])
    counts = {"student": int(np.sum(sources == SRC_STUDENT)), "teacher": int(np.sum(sources == SRC_TEACHER)),
              "revise": sum(s["num_tokens"] for s in segments if s["source"] == "revise")}
    return {
        "id": question_id, "sample_index": sample_index, "prompt": prompt, "teacher_prompt": prompt,
        "policy": policy_name,
        "response": "".join(s["text"] for s in segments), "segments": segments,
        # value None: a step the teacher wrote (one-step policies), or no teacher monitoring (student-only).
        # entropy: the teacher's top-k entropy H(s_{t-1}) at the state before the step, which set eps.
        "steps": [{"start": int(start), "value": None if np.isnan(v) else float(v), "eps": float(e),
                   "entropy": float(h)}
                  for start, v, e, h in zip(slot["step_start"][:num_steps], slot["step_value"][:num_steps],
                                            slot["step_eps"][:num_steps], slot["step_h"][:num_steps])],
        "breach_step": breach or None, "root_step": int(slot["root_step"]) or None,
        "safe_prefix_tokens": int(slot["safe_len"]) if breach else None,
        "interventions": int(slot["interventions"]), "tokens": counts,
        "finish_reason": FINISH_NAMES[int(slot["finish"])],
        "speculative": {"drafted": int(slot["drafted"]), "accepted": int(slot["accepted_drafts"])},
        "teacher_forwards": int(slot["teacher_forwards"]),
    }


def read_done(path: str | os.PathLike) -> set[tuple[str, int]]:
    """(id, sample_index) pairs already in `path` (a torn last line is cut off)."""
    return {(str(i), int(r)) for i, r in read_records(path, ("id", "sample_index"))}
