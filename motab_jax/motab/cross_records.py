"""Records of cross-vocabulary synthesis: the shared record schema (`records.build_record`), with teacher text kept
in both vocabularies.

Student segments hold the student's own ids. A teacher segment holds the teacher's text, the ids the teacher
wrote (`teacher_token_ids`, teacher vocabulary) and that text encoded by the student's tokenizer (`token_ids`), so
SFT reads student ids only and never takes a teacher id for a student one. `tokens` counts by provenance in the
student's vocabulary, plus `teacher_native` (the teacher's own ids). The seam, special ids and the text stream follow
`stitching`, as in the shared-vocabulary records.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import TYPE_CHECKING, Any

from motab_jax.motab.policies import Policy
from motab_jax.motab.state import FINISH_NAMES
from motab_jax.motab.stitching import Piece, build_segments, revise_piece, vocabulary
from motab_jax.text.harmony import decode_reply

if TYPE_CHECKING:
    from motab_jax.motab.cross_engine import _Trajectory


@dataclasses.dataclass
class StepRecord:
    source: str  # "student" or "teacher"
    student_ids: list[int]  # the step in the student's vocabulary (a teacher step: its text re-encoded)
    context_chars: int  # characters of the teacher's context text before the step (where a rewind cuts)
    value: float  # V_T (NaN: not judged)
    eps: float
    entropy: float  # the teacher's top-k entropy after the context, which set eps
    teacher_ids: list[int] = dataclasses.field(default_factory=list)
    kept: bool = True  # False: a rejected student step
    is_step: bool = True  # False: the teacher's final continuation (a segment of the record, not a step)


def _record_steps(traj: _Trajectory, policy: Policy) -> list[StepRecord]:
    """The steps whose text is in the record, in order (REVISE is placed by the caller)."""
    if policy.teacher_writes == "one_step" or not traj.breach_step:
        return [s for s in traj.steps if s.kept]
    final = [s for s in traj.steps[traj.breach_step:] if s.source == "teacher"]
    explored = traj.steps[:traj.breach_step] if policy.stitch else traj.steps[:traj.root_step - 1]
    return explored + final


def _text(tokenizer: Any, ids: list[int]) -> str:
    return decode_reply(tokenizer, ids)


def build_cross_record(traj: _Trajectory, student_tokenizer: Any, teacher_tokenizer: Any, *, policy: Policy,
                       revise: str) -> dict[str, Any]:
    """Record fields of a finished trajectory (the caller adds id, sample index, prompts and policy name). Segments
    follow `stitching`: the seam of spec 3.8, no special student id but the last, one byte stream."""
    vocab = vocabulary(student_tokenizer)
    stitched = policy.stitch and policy.teacher_writes == "until_end" and bool(traj.breach_step)
    record_steps = _record_steps(traj, policy)
    for step in record_steps:
        if step.source == "teacher" and not step.student_ids and step.teacher_ids:
            step.student_ids = list(student_tokenizer(_text(teacher_tokenizer, step.teacher_ids),
                                                      add_special_tokens=False)["input_ids"])
    # Each record step's ids as the record keeps them: no special token but the record's last id.
    keep = vocab.keep([t for step in record_steps for t in step.student_ids])
    kept_ids: dict[int, list[int]] = {}
    dropped: list[dict[str, Any]] = []
    offset, in_record = 0, 0
    for step in record_steps:
        ids = kept_ids[id(step)] = []
        for t, k in zip(step.student_ids, keep[offset:offset + len(step.student_ids)]):
            if k:
                ids.append(int(t))
            else:
                dropped.append({"offset": in_record + len(ids), "source": step.source, "id": int(t)})
        offset += len(step.student_ids)
        in_record += len(ids)
    pieces: list[Piece] = []
    for source, run in itertools.groupby(record_steps, key=lambda s: s.source):
        run = list(run)
        ids = [t for step in run for t in kept_ids[id(step)]]
        if source == "student":
            pieces.append(Piece("student", ids, vocab.bytes_of(ids)))
            continue
        if stitched and not any(p.source == "revise" for p in pieces):
            pieces.append(revise_piece(revise, pieces, student_tokenizer))
        teacher_ids = [t for step in run for t in step.teacher_ids]
        pieces.append(Piece("teacher", ids, _text(teacher_tokenizer, teacher_ids).encode(),
                            {"teacher_token_ids": teacher_ids}))
    segments = build_segments(pieces)
    steps, offset = [], 0
    for step in traj.steps:
        if not step.is_step:
            continue
        steps.append({"start": offset, "value": None if math.isnan(step.value) else step.value, "eps": step.eps,
                      "entropy": step.entropy, "source": step.source})
        offset += len(kept_ids.get(id(step), ()))
    safe = sum(len(kept_ids.get(id(s), s.student_ids)) for s in traj.steps[:max(traj.root_step - 1, 0)] if s.kept)
    counts = {name: sum(s["num_tokens"] for s in segments if s["source"] == name)
              for name in ("student", "teacher", "revise")}
    counts["teacher_native"] = sum(len(s.get("teacher_token_ids", [])) for s in segments)
    return {
        "response": "".join(s["text"] for s in segments), "segments": segments, "steps": steps,
        "breach_step": traj.breach_step or None, "root_step": traj.root_step or None,
        "safe_prefix_tokens": safe if traj.breach_step else None, "interventions": traj.interventions,
        "tokens": counts, "dropped_special_ids": dropped, "finish_reason": FINISH_NAMES[traj.finish],
        "speculative": {"drafted": 0, "accepted": 0}, "teacher_forwards": traj.teacher_forwards,
        "teacher_prompt": traj.job.teacher_prompt_text,
    }
