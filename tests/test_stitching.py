"""The stitch seam (spec 3.8), special tokens and the text stream of synthesis records (`motab.stitching`), through
both engines' record builders (`records.build_record`, `cross_records.build_cross_record`) and SFT formatting, on
exact strings.

Records are built from finished trajectories laid out as the engines leave them (`transition._backtrack`: a
stitched record holds steps 1..t, else steps 1..t*-1, then the teacher's tokens; `cross_engine`: the step list).
The student's tokenizer is the byte-level one without merges, whose ids 0..255 are the bytes themselves, so the SFT
row of a response must be exactly the response's UTF-8 bytes followed by one end-of-sequence id.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from motab_jax.data import format_example, format_examples, parse_record
from motab_jax.data.sources import Example
from motab_jax.motab import make_policy
from motab_jax.motab.cross_engine import CrossJob, _Trajectory
from motab_jax.motab.cross_records import StepRecord, build_cross_record
from motab_jax.motab.records import build_record
from motab_jax.motab.state import FINISH_EOS, SRC_STUDENT, SRC_TEACHER
from motab_jax.motab.stitching import split_stream
from motab_jax.text import byte_level_tokenizer

TOK = byte_level_tokenizer()
ENDOFTEXT, EOS, IM_START = 256, 257, 258  # TOK's special tokens; EOS is <|im_end|>
# The teacher of the cross-vocabulary records: another vocabulary (merged ids), its own EOS.
TEACHER_TOK = byte_level_tokenizer(merges=[("Ġ", "t"), ("h", "e"), ("Ġt", "he")])
TEACHER_EOS = TEACHER_TOK.eos_token_id
POLICIES = ["motab", "motab_no_adaptive", "motab_no_backtrack", "motab_no_stitch"]

STEPS = ["Let x = 2.\n\n", "So x + 1 = 4.\n\n"]
LAST_STEPS = {  # the breaching step t, by how it ended
    "delimiter": list(b"Thus 2x = 5.\n\n"),
    "eos": list(b"The answer is 5") + [EOS],
    "step cap": list(b"The answer i"),
}
TEACHER = "Since x = 2, x + 1 = 3.\n\nThe answer is 3."

# The exact responses: breach at step 3, root cause step 2 (t* = 3 without backtracking).
STITCHED = {
    "delimiter": "Let x = 2.\n\nSo x + 1 = 4.\n\nThus 2x = 5.\n\nHowever,\n\nSince x = 2, x + 1 = 3.\n\nThe answer is 3.",
    "eos": "Let x = 2.\n\nSo x + 1 = 4.\n\nThe answer is 5\n\nHowever,\n\nSince x = 2, x + 1 = 3.\n\nThe answer is 3.",
    "step cap": "Let x = 2.\n\nSo x + 1 = 4.\n\nThe answer i\n\nHowever,\n\nSince x = 2, x + 1 = 3.\n\nThe answer is 3.",
}
NOT_STITCHED = "Let x = 2.\n\nSince x = 2, x + 1 = 3.\n\nThe answer is 3."  # safe prefix (step 1) + teacher
# Breach at step 1 (t = t* = 1).
FIRST_STEP = {
    "delimiter": "Thus 2x = 5.\n\nHowever,\n\nSince x = 2, x + 1 = 3.\n\nThe answer is 3.",
    "eos": "The answer is 5\n\nHowever,\n\nSince x = 2, x + 1 = 3.\n\nThe answer is 3.",
    "step cap": "The answer i\n\nHowever,\n\nSince x = 2, x + 1 = 3.\n\nThe answer is 3.",
}


def _bytes(text: str) -> list[int]:
    return list(text.encode())


def _slot(steps: list[list[int]], teacher: list[int], *, t_star: int, stitch: bool) -> dict[str, np.ndarray]:
    """The finished slot of a trajectory whose last step (t = len(steps)) breached, the teacher then writing
    `teacher` from the state before step t*."""
    starts = np.cumsum([0] + [len(s) for s in steps])[:-1]
    safe = int(starts[t_star - 1])
    explored = [i for s in (steps if stitch else steps[:t_star - 1]) for i in s]
    tokens = explored + teacher
    pad = 4  # the state arrays are wider than the record
    t = len(steps)
    return {"out_len": len(tokens), "out_tokens": np.asarray(tokens + [0] * pad),
            "out_src": np.asarray([SRC_STUDENT] * len(explored) + [SRC_TEACHER] * len(teacher) + [0] * pad),
            "explore_len": len(explored), "breach_step": t, "root_step": t_star, "safe_len": safe, "num_steps": t,
            "step_start": starts, "step_value": np.linspace(0.9, 0.05, t), "step_eps": np.full(t, 0.1),
            "step_h": np.zeros(t), "interventions": 1, "finish": FINISH_EOS, "drafted": 0, "accepted_drafts": 0,
            "teacher_forwards": t}


def _token_record(policy_name: str, steps: list[str], last: list[int], *, revise: str = "However,") -> dict:
    policy = make_policy(policy_name)
    ids = [_bytes(s) for s in steps] + [last]
    t_star = min(2, len(ids)) if policy.backtrack else len(ids)
    slot = _slot(ids, _bytes(TEACHER) + [EOS], t_star=t_star, stitch=policy.stitch)
    return build_record(TOK, slot, question_id="q", sample_index=0, prompt="Q: x = 2; x + 1?\n", policy_name=policy.name,
                        stitched=policy.stitch, revise=revise)


def _trajectory(steps: list[StepRecord], *, breach: int = 0, root: int = 0) -> _Trajectory:
    traj = _Trajectory(CrossJob(0, [1], "teacher prompt", 0), [], None, 1, steps=steps)
    traj.breach_step, traj.root_step, traj.finish = breach, root, FINISH_EOS
    traj.safe_tokens = sum(len(s.student_ids) for s in steps[:max(root - 1, 0)] if s.kept)
    return traj


def _teacher_ids(text: str) -> list[int]:
    return TEACHER_TOK(text, add_special_tokens=False)["input_ids"]


def _cross_record(policy_name: str, steps: list[str], last: list[int], *, revise: str = "However,") -> dict:
    policy = make_policy(policy_name)
    ids = [_bytes(s) for s in steps] + [last]
    chars = np.cumsum([0] + [len(s) for s in steps])
    records = [StepRecord("student", s, int(c), 0.9, 0.1, 0.0) for s, c in zip(ids, chars)]
    records[-1].kept, records[-1].value = False, 0.01  # the breaching step
    t_star = min(2, len(ids)) if policy.backtrack else len(ids)
    records.append(StepRecord("teacher", [], int(chars[t_star - 1]), math.nan, 0.0, 0.0,
                              teacher_ids=_teacher_ids(TEACHER) + [TEACHER_EOS], is_step=False))
    traj = _trajectory(records, breach=len(ids), root=t_star)
    return build_cross_record(traj, TOK, TEACHER_TOK, policy=policy, revise=revise)


BUILDERS = {"token": _token_record, "text": _cross_record}


def _sft_row(record: dict) -> tuple[list[int], list[int]]:
    """The response part of the record's SFT row: (ids, loss mask)."""
    item = format_example(parse_record({"id": "q", "sample_index": 0, "prompt": "p", **record}, where="record"), TOK)
    return item.input_ids[item.num_prompt_tokens:].tolist(), item.loss_mask[item.num_prompt_tokens:].tolist()


def _check(record: dict, response: str) -> None:
    """The record reads `response` exactly, holds no special id, and trains on its bytes and one final EOS."""
    assert record["response"] == response
    assert "".join(s["text"] for s in record["segments"]) == response
    ids = [i for s in record["segments"] for i in s["token_ids"]]
    assert not {ENDOFTEXT, EOS, IM_START} & set(ids[:-1]), "a special id inside the record"
    for segment in record["segments"]:
        if segment["source"] == "revise":  # the revise ids are the student tokenizer's encoding of its text
            assert segment["token_ids"] == TOK(segment["text"], add_special_tokens=False)["input_ids"]
    row, mask = _sft_row(record)
    assert row == _bytes(response) + [EOS] and mask == [1] * len(row)
    assert TOK.decode(row) == response + "<|im_end|>"


@pytest.mark.parametrize("engine", BUILDERS)
@pytest.mark.parametrize("last", LAST_STEPS)
@pytest.mark.parametrize("policy", POLICIES)
def test_the_seam_on_exact_strings(engine, policy, last):
    build = BUILDERS[engine]
    record = build(policy, STEPS, LAST_STEPS[last])
    _check(record, NOT_STITCHED if policy == "motab_no_stitch" else STITCHED[last])
    assert record["breach_step"] == 3 and record["root_step"] == (3 if policy == "motab_no_backtrack" else 2)
    # t = 1: the breach at the first step; without stitching the record is the teacher's text alone.
    record = build(policy, [], LAST_STEPS[last])
    _check(record, TEACHER if policy == "motab_no_stitch" else FIRST_STEP[last])
    assert record["safe_prefix_tokens"] == 0


@pytest.mark.parametrize("engine", BUILDERS)
def test_the_revise_text_is_configurable_and_its_ids_encode_exactly_what_it_adds(engine):
    record = BUILDERS[engine]("motab", STEPS, LAST_STEPS["delimiter"], revise="Wait,")
    _check(record, STITCHED["delimiter"].replace("However,", "Wait,"))
    (revise,) = [s for s in record["segments"] if s["source"] == "revise"]
    assert revise["text"] == "Wait,\n\n" and record["tokens"]["revise"] == len("Wait,\n\n")
    record = BUILDERS[engine]("motab", STEPS, LAST_STEPS["step cap"], revise="Wait,")
    (revise,) = [s for s in record["segments"] if s["source"] == "revise"]
    assert revise["text"] == "\n\nWait,\n\n"


@pytest.mark.parametrize("engine", BUILDERS)
def test_a_breaching_step_ending_with_eos_keeps_its_text_not_its_eos(engine):
    record = BUILDERS[engine]("motab", STEPS, LAST_STEPS["eos"])
    student = [i for s in record["segments"] if s["source"] == "student" for i in s["token_ids"]]
    assert student == _bytes("".join(STEPS) + "The answer is 5")
    assert record["dropped_special_ids"] == [{"offset": len(student), "source": "student", "id": EOS}]
    assert record["tokens"]["student"] == len(student)
    assert [s["start"] for s in record["steps"]] == [0, len(STEPS[0]), len(STEPS[0]) + len(STEPS[1])]
    # A step that is only an EOS (step 1): no student text, so REVISE opens the response.
    if engine == "token":
        slot = _slot([[EOS]], _bytes(TEACHER) + [EOS], t_star=1, stitch=True)
        record = build_record(TOK, slot, question_id="q", sample_index=0, prompt="p", policy_name="motab",
                              stitched=True, revise="However,")
    else:
        steps = [StepRecord("student", [EOS], 0, 0.01, 0.1, 0.0, kept=False),
                 StepRecord("teacher", [], 0, math.nan, 0.0, 0.0, teacher_ids=_teacher_ids(TEACHER) + [TEACHER_EOS],
                            is_step=False)]
        record = build_cross_record(_trajectory(steps, breach=1, root=1), TOK, TEACHER_TOK, policy=make_policy("motab"),
                                    revise="However,")
    _check(record, "However,\n\n" + TEACHER)


def _skd_step_records() -> dict[str, dict]:
    """SKD step-level: step 1 kept (with a <|im_start|> the student sampled inside it), step 2 rejected and rewritten
    by the teacher, step 3 kept and ended with EOS; in both engines."""
    step1 = _bytes("Let x") + [IM_START] + _bytes(" = 2.\n\n")
    rewrite = "So x + 1 = 3.\n\n"
    step3 = _bytes("The answer is 3") + [EOS]
    tokens = step1 + _bytes(rewrite) + step3
    sources = [SRC_STUDENT] * len(step1) + [SRC_TEACHER] * len(rewrite) + [SRC_STUDENT] * len(step3)
    slot = _slot([step1], [], t_star=1, stitch=False)
    # The engine's step history: 1, the rejected 2 (rewound: the teacher's step starts where it did), the
    # teacher's step, 3.
    slot.update(out_len=len(tokens), out_tokens=np.asarray(tokens), out_src=np.asarray(sources), breach_step=2,
                root_step=2, safe_len=len(step1), explore_len=len(step1), num_steps=4,
                step_start=np.asarray([0, len(step1), len(step1), len(step1) + len(rewrite)]),
                step_value=np.asarray([0.9, 0.1, np.nan, 0.8]), step_eps=np.zeros(4), step_h=np.zeros(4))
    token = build_record(TOK, slot, question_id="q", sample_index=0, prompt="p", policy_name="skd_step", stitched=False,
                         revise="However,")
    steps = [StepRecord("student", step1, 0, 0.9, 0.0, 0.0),
             StepRecord("student", _bytes("So x + 1 = 4.\n\n"), 12, 0.1, 0.0, 0.0, kept=False),
             StepRecord("teacher", _bytes(rewrite), 12, math.nan, 0.0, 0.0, teacher_ids=_teacher_ids(rewrite)),
             StepRecord("student", step3, 27, 0.8, 0.0, 0.0)]
    text = build_cross_record(_trajectory(steps, breach=2, root=2), TOK, TEACHER_TOK, policy=make_policy("skd_step"),
                              revise="However,")
    return {"token": token, "text": text}


@pytest.mark.parametrize("engine", BUILDERS)
def test_skd_step_records_keep_only_the_final_eos(engine):
    record = _skd_step_records()[engine]
    _check(record, "Let x = 2.\n\nSo x + 1 = 3.\n\nThe answer is 3")
    assert [s["source"] for s in record["segments"]] == ["student", "teacher", "student"]
    assert record["segments"][-1]["token_ids"][-1] == EOS  # the final EOS stays: it ended the trajectory
    assert record["dropped_special_ids"] == [{"offset": 5, "source": "student", "id": IM_START}]
    # Steps: 1, the rejected 2 (not in the record), the teacher's rewrite, 3; offsets count the record's ids.
    assert [s["start"] for s in record["steps"]] == [0, 12, 12, 27]
    assert record["safe_prefix_tokens"] == 12


def test_skd_token_records_drop_special_ids_from_every_source():
    # Token-level SKD: the teacher replaced two tokens, one of them by its <|endoftext|>.
    pieces = [("student", _bytes("x = ")), ("teacher", [ENDOFTEXT]), ("student", _bytes("2, so")),
              ("teacher", _bytes(" y")), ("student", _bytes(" = 3") + [EOS])]
    tokens = [i for _, ids in pieces for i in ids]
    sources = [SRC_TEACHER if s == "teacher" else SRC_STUDENT for s, ids in pieces for _ in ids]
    slot = _slot([tokens], [], t_star=1, stitch=True)
    slot.update(out_src=np.asarray(sources), breach_step=0, root_step=0, safe_len=0, num_steps=0)
    record = build_record(TOK, slot, question_id="q", sample_index=0, prompt="p", policy_name="skd_token",
                          stitched=True, revise="However,")
    _check(record, "x = 2, so y = 3")
    # The dropped teacher id leaves two student runs side by side: one segment.
    assert [s["text"] for s in record["segments"]] == ["x = 2, so", " y", " = 3"]
    assert record["dropped_special_ids"] == [{"offset": 4, "source": "teacher", "id": ENDOFTEXT}]


# ----------------------------------------------------------------------------------------- one byte stream

def test_a_character_split_across_a_seam_is_one_character():
    # motab_no_stitch: step 1 reached the step cap after the first byte of "é" (C3 A9); the teacher, continuing from
    # exactly that context, wrote A9 and the rest.
    steps = [_bytes("x = ") + [0xC3], _bytes("y.\n\n")]
    slot = _slot(steps, [0xA9] + _bytes("t, done.") + [EOS], t_star=2, stitch=False)
    record = build_record(TOK, slot, question_id="q", sample_index=0, prompt="p", policy_name="motab_no_stitch",
                          stitched=False, revise="However,")
    _check(record, "x = ét, done.")
    # The character belongs to the segment that completes it.
    assert [s["text"] for s in record["segments"]] == ["x = ", "ét, done."]
    # Token-level alternation inside one character ("€" = E2 82 AC): still one character.
    slot.update(out_tokens=np.asarray([0xE2, 0x82, 0xAC, EOS]), out_src=np.asarray([0, 1, 0, 0]), out_len=4,
                breach_step=0, num_steps=0)
    record = build_record(TOK, slot, question_id="q", sample_index=0, prompt="p", policy_name="skd_token",
                          stitched=False, revise="However,")
    _check(record, "€")


@pytest.mark.parametrize("engine", BUILDERS)
def test_a_step_cut_inside_a_character_before_revise_keeps_the_revise_text_exact(engine):
    # The breaching step hit the step cap after the first byte of "é": that byte is never completed, so it reads
    # as U+FFFD in the student's segment and REVISE is preceded by the paragraph break.
    record = BUILDERS[engine]("motab", STEPS, _bytes("The answer is caf") + [0xC3])
    assert record["response"] == ("Let x = 2.\n\nSo x + 1 = 4.\n\nThe answer is caf\ufffd\n\nHowever,\n\n" + TEACHER)
    assert [s["text"] for s in record["segments"] if s["source"] == "revise"] == ["\n\nHowever,\n\n"]


def test_split_stream_equals_decoding_the_whole_stream():
    rng = random.Random(0)
    pieces = [b"\xe2\x82\xac", b"\xc3\xa9", b"\xf0\x9f\x98\x80", b"a", b"\n", b"\x80", b"\xe0", b"\xf8", b"\xc0\xaf",
              b"\xed\xa0\x80"]
    for _ in range(3000):
        data = (b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 8))) if rng.random() < 0.5
                else bytes(rng.randrange(256) for _ in range(rng.randint(0, 12))))
        cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 4)))
        parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        texts = split_stream(parts)
        assert len(texts) == len(parts) and "".join(texts) == data.decode("utf-8", "replace"), parts


# ----------------------------------------------------------------------------------------------- formatting

def test_formatting_drops_special_ids_from_records_written_before_the_fix():
    # A record of the old layout: "\n\n" + REVISE + "\n\n" after a step that ended with ".\n\n" and the student's
    # EOS left in its ids. Formatting keeps the text as written and drops the EOS from the middle of the row.
    student = _bytes("Thus 2x = 5.\n\n") + [EOS]
    record = {"id": "q", "sample_index": 0, "prompt": "p", "response": "Thus 2x = 5.\n\n\n\nHowever,\n\n" + TEACHER,
              "segments": [{"source": "student", "text": "Thus 2x = 5.\n\n", "token_ids": student},
                           {"source": "revise", "text": "\n\nHowever,\n\n"},
                           {"source": "teacher", "text": TEACHER, "token_ids": _bytes(TEACHER) + [EOS]}]}
    example = parse_record(record, where="old.jsonl:1")
    (item,), stats = format_examples([example], TOK)
    row = item.input_ids[item.num_prompt_tokens:].tolist()
    assert row == _bytes(record["response"]) + [EOS]
    assert stats.dropped_special_tokens == 1  # the final EOS is replaced, not counted
    # Text examples: a literal special token in a dataset's response is dropped as well.
    (item,), stats = format_examples([Example("a", "p", "one<|im_start|>two<|endoftext|> three")], TOK,
                                     apply_chat_template=False)
    assert TOK.decode(item.input_ids[item.num_prompt_tokens:]) == "onetwo three<|im_end|>"
    assert stats.dropped_special_tokens == 2
