"""Records of cross-vocabulary synthesis: the shared record schema (`records.build_record`), with teacher text kept
in both vocabularies.

Student segments hold the student's own ids. A teacher segment holds the teacher's text, the ids the teacher
wrote (`teacher_token_ids`, teacher vocabulary) and that text encoded by the student's tokenizer (`token_ids`), so
SFT reads student ids only and never takes a teacher id for a student one. `tokens` counts by provenance in the
student's vocabulary, plus `teacher_native` (the teacher's own ids).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from motab_jax.motab.policies import Policy
from motab_jax.motab.state import FINISH_NAMES
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
    """Record fields of a finished trajectory (the caller adds id, sample index, prompts and policy name)."""
    segments: list[dict[str, Any]] = []
    stitched = policy.stitch and policy.teacher_writes == "until_end" and bool(traj.breach_step)
    record_steps = _record_steps(traj, policy)
    for step in record_steps:
        if step.source == "teacher" and not step.student_ids and step.teacher_ids:
            step.student_ids = list(student_tokenizer(_text(teacher_tokenizer, step.teacher_ids),
                                                      add_special_tokens=False)["input_ids"])
        if stitched and step.source == "teacher" and not any(s["source"] == "revise" for s in segments):
            revise_text = f"\n\n{revise}\n\n"
            ids = student_tokenizer(revise_text, add_special_tokens=False)["input_ids"]
            segments.append({"source": "revise", "num_tokens": len(ids), "token_ids": ids, "text": revise_text})
        if segments and segments[-1]["source"] == step.source:
            segment = segments[-1]
        else:
            segment = {"source": step.source, "num_tokens": 0, "token_ids": []}
            if step.source == "teacher":
                segment["teacher_token_ids"] = []
            segments.append(segment)
        segment["token_ids"] += step.student_ids
        segment["num_tokens"] = len(segment["token_ids"])
        if step.source == "teacher":
            segment["teacher_token_ids"] += step.teacher_ids
    for segment in segments:
        if segment["source"] == "student":
            segment["text"] = _text(student_tokenizer, segment["token_ids"])
        elif segment["source"] == "teacher":
            segment["text"] = _text(teacher_tokenizer, segment["teacher_token_ids"])
    steps, offset = [], 0
    in_record = {id(s) for s in record_steps}
    for step in traj.steps:
        if not step.is_step:
            continue
        steps.append({"start": offset, "value": None if math.isnan(step.value) else step.value, "eps": step.eps,
                      "entropy": step.entropy, "source": step.source})
        if id(step) in in_record:
            offset += len(step.student_ids)
    counts = {name: sum(s["num_tokens"] for s in segments if s["source"] == name)
              for name in ("student", "teacher", "revise")}
    counts["teacher_native"] = sum(len(s.get("teacher_token_ids", [])) for s in segments)
    return {
        "response": "".join(s["text"] for s in segments), "segments": segments, "steps": steps,
        "breach_step": traj.breach_step or None, "root_step": traj.root_step or None,
        "safe_prefix_tokens": traj.safe_tokens if traj.breach_step else None, "interventions": traj.interventions,
        "tokens": counts, "finish_reason": FINISH_NAMES[traj.finish],
        "speculative": {"drafted": 0, "accepted": 0}, "teacher_forwards": traj.teacher_forwards,
        "teacher_prompt": traj.job.teacher_prompt_text,
    }
