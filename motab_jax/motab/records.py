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
from motab_jax.motab.stitching import Piece, Vocabulary, build_segments, revise_piece, vocabulary


_SOURCE_NAMES = {SRC_STUDENT: "student", SRC_TEACHER: "teacher"}


def _pieces(vocab: Vocabulary, tokens: np.ndarray, sources: np.ndarray) -> list[Piece]:
    """Consecutive runs of one provenance."""
    out: list[Piece] = []
    start = 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or sources[i] != sources[start]:
            ids = tokens[start:i].tolist()
            out.append(Piece(_SOURCE_NAMES[int(sources[start])], ids, vocab.bytes_of(ids)))
            start = i
    return out


def build_record(tokenizer: Any, slot: dict[str, np.ndarray], *, question_id: str, sample_index: int,
                 prompt: str, policy_name: str, stitched: bool, revise: str) -> dict[str, Any]:
    """The record of one finished trajectory; `slot` holds that slot's row of every state array; `prompt` is the
    text both models were prompted with (the teacher tokenizer's rendering). Segments follow `stitching`: the seam
    of spec 3.8, no special id but the last, one byte stream."""
    vocab = vocabulary(tokenizer)
    length = int(slot["out_len"])
    tokens, sources = slot["out_tokens"][:length], slot["out_src"][:length]
    keep = vocab.keep(tokens)
    # kept[i]: record ids before record position i (offsets into the engine's record become offsets into ours).
    kept = np.concatenate([[0], np.cumsum(keep)]).astype(int)

    def offset(position: int) -> int:
        # A step the record no longer holds (cut back to the safe prefix) may start past its end.
        return int(kept[min(position, length)]) + max(position - length, 0)

    def runs(a: int, b: int) -> list[Piece]:
        return _pieces(vocab, tokens[a:b][keep[a:b]], sources[a:b][keep[a:b]])

    breach, explore_len = int(slot["breach_step"]), int(slot["explore_len"])
    if stitched and breach:
        # Spec eq. 11: steps 1..t (all student steps, the flawed ones too), REVISE, teacher.
        explored = runs(0, explore_len)
        pieces = explored + [revise_piece(revise, explored, tokenizer)] + runs(explore_len, length)
    else:
        pieces = runs(0, length)
    segments = build_segments(pieces)
    num_steps = int(slot["num_steps"])
    counts = {name: sum(s["num_tokens"] for s in segments if s["source"] == name)
              for name in ("student", "teacher", "revise")}
    return {
        "id": question_id, "sample_index": sample_index, "prompt": prompt, "teacher_prompt": prompt,
        "policy": policy_name,
        "response": "".join(s["text"] for s in segments), "segments": segments,
        # value None: a step the teacher wrote (one-step policies), or no teacher monitoring (student-only).
        # entropy: the teacher's top-k entropy H(s_{t-1}) at the state before the step, which set eps.
        "steps": [{"start": offset(int(start)), "value": None if np.isnan(v) else float(v), "eps": float(e),
                   "entropy": float(h)}
                  for start, v, e, h in zip(slot["step_start"][:num_steps], slot["step_value"][:num_steps],
                                            slot["step_eps"][:num_steps], slot["step_h"][:num_steps])],
        "breach_step": breach or None, "root_step": int(slot["root_step"]) or None,
        "safe_prefix_tokens": offset(int(slot["safe_len"])) if breach else None,
        "interventions": int(slot["interventions"]), "tokens": counts,
        "dropped_special_ids": [{"offset": offset(p), "source": _SOURCE_NAMES[int(sources[p])], "id": int(tokens[p])}
                                for p in np.flatnonzero(~keep).tolist()],
        "finish_reason": FINISH_NAMES[int(slot["finish"])],
        "speculative": {"drafted": int(slot["drafted"]), "accepted": int(slot["accepted_drafts"])},
        "teacher_forwards": int(slot["teacher_forwards"]),
    }


def read_done(path: str | os.PathLike) -> set[tuple[str, int]]:
    """(id, sample_index) pairs already in `path` (a torn last line is cut off)."""
    return {(str(i), int(r)) for i, r in read_records(path, ("id", "sample_index"))}
