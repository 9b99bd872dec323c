"""The synthesis engine against the step-by-step reference (tests/motab_reference.py), plus the
automaton, speculative decoding's distribution, refills, resume, sharding and memory checks."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import motab_jax
import motab_reference as ref
from fixtures.make_golden import GOLDEN_DIR, TOKENIZER_SIZE
from motab_jax.models.sharding import MeshConfig, make_mesh
from motab_jax.models.transformer import param_values, set_param_values
from motab_jax.motab import build_delimiter_tables, root_cause
from motab_jax.text import special_token_mask, token_bytes_table
from test_sampling import _chi_square_pvalue

WORDS = ["cat", "dog", "sun", "moon", "tree", "sky"]
EOS = 260
BASE = dict(num_slots=3, samples_per_question=1, traj_cap=60, step_cap=10, max_prompt_len=32, teacher_min_budget=6,
            max_steps=32, temperature=0.0, teacher_temperature=0.0, instruction="", prompt_format="raw")


@functools.lru_cache(maxsize=None)
def _models(noise: float = 0.3, mesh_shape: tuple[int, int] | None = None):
    """Teacher: the golden Qwen3 fixture. Student: the same weights plus Gaussian noise (shared vocabulary)."""
    mesh = make_mesh(MeshConfig(data=mesh_shape[0], tensor=mesh_shape[1])) if mesh_shape else None
    teacher, tok = motab_jax.load(GOLDEN_DIR / "qwen3_untied", dtype="float32", mesh=mesh)
    student, _ = motab_jax.load(GOLDEN_DIR / "qwen3_untied", dtype="float32", mesh=mesh)
    rng = np.random.default_rng(0)
    noisy = {name: np.asarray(v) + noise * np.std(np.asarray(v)) * rng.normal(size=v.shape).astype(np.float32)
             for name, v in param_values(student).items()}
    set_param_values(student, {name: jax.device_put(v, param_values(student)[name].sharding)
                               for name, v in noisy.items()})
    return student, teacher, tok


def _questions(n: int = 6):
    return [{"id": f"q{i}", "problem": f"the {w}"} for i, w in enumerate(WORDS[:n])]


def _run(policy: str, **overrides):
    student, teacher, tok = _models()
    cfg = dict(BASE, policy=policy, **overrides)
    return sorted(motab_jax.synthesize(student, teacher, tok, _questions(), cfg, progress=False),
                  key=lambda r: r["id"])


def _ids(record, source):
    return [t for s in record["segments"] if s["source"] == source for t in s["token_ids"]]


def _generated(record, source=None):
    """The record's (source, id) stream as the engine generated it: its ids (revise left out) with the special ids
    it dropped (`motab.stitching`: none but the last stays) put back; only `source`'s ids when given."""
    stream = [(s["source"], t) for s in record["segments"] if s["source"] != "revise" for t in s["token_ids"]]
    for n, dropped in enumerate(record["dropped_special_ids"]):
        stream.insert(dropped["offset"] + n, (dropped["source"], dropped["id"]))
    return stream if source is None else [t for s, t in stream if s == source]


def _as_recorded(tok, runs):
    """Runs of a reference's ids as a record keeps them: without special ids, except the record's last id."""
    special = set(np.flatnonzero(special_token_mask(tok)).tolist())
    last, n, out = sum(map(len, runs)) - 1, 0, []
    for run in runs:
        out.append([t for i, t in enumerate(run, n) if t not in special or i == last])
        n += len(run)
    return out


def _classify(tok, steps, delimiter):
    """Which delimiter situations the reference trajectory exercised."""
    seen = set()
    for step in steps:
        text, last = tok.decode(step), tok.decode(step[-1:])
        if delimiter in text:
            if delimiter not in last:
                seen.add("delimiter split over tokens")
            elif not last.endswith(delimiter):
                seen.add("delimiter completed inside a token")
            else:
                seen.add("delimiter ends a token")
    return seen


COVERAGE: set[str] = set()
MOTAB_CASES = [  # delimiter, eps0, theta, extra stop tokens, backtracking
    ("the", 0.1, 1.0, (), True),
    ("the", 0.1, 1.0, (), False),
    ("=", 0.1, 1.0, (181,), True),
    ("J", 0.3, 0.5, (), True),
    ("\x01", 0.05, 0.0, (5,), True),
    ("J(", 0.1, 2.0, (), True),
    ("\x1c ", 0.1, 1.0, (), False),
    (" t", 0.1, 1.0, (), True),
]


@pytest.mark.parametrize("delimiter,eps0,theta,extra,backtrack", MOTAB_CASES)
def test_motab_equals_reference(delimiter, eps0, theta, extra, backtrack):
    student, teacher, tok = _models()
    records = _run("motab" if backtrack else "motab_no_backtrack", delimiter=delimiter, eps0=eps0, theta=theta,
                   extra_stop_tokens=extra)
    settings = ref.Settings(delimiter=delimiter, eos=tuple(sorted({EOS, *extra})), step_cap=10, traj_cap=60,
                            teacher_min_budget=6)
    S, T = ref.Forward(student), ref.Forward(teacher)
    for question, record in zip(_questions(), records):
        prompt = tok(question["problem"])["input_ids"]
        want = ref.motab(S, T, tok, prompt, settings, eps0, theta, backtrack=backtrack)
        assert record["breach_step"] == want["breach"] and record["root_step"] == want["root"]
        np.testing.assert_allclose([s["value"] for s in record["steps"]], want["values"], atol=1e-5, rtol=0)
        np.testing.assert_allclose([s["eps"] for s in record["steps"]], want["eps"], atol=1e-5, rtol=0)
        np.testing.assert_allclose([s["entropy"] for s in record["steps"]], want["entropy"], atol=1e-5, rtol=0)
        assert _generated(record) == ([("student", t) for step in want["steps"] for t in step]
                                      + [("teacher", t) for t in want["teacher"]])
        *steps, teacher = _as_recorded(tok, want["steps"] + [want["teacher"]])
        student_ids = _ids(record, "student")
        starts = [s["start"] for s in record["steps"]] + [len(student_ids)]
        assert [student_ids[a:b] for a, b in zip(starts, starts[1:])] == steps
        assert _ids(record, "teacher") == teacher
        assert record["finish_reason"] == want["finish"]
        if want["breach"]:
            # Spec 3.8: steps 1..t, then "\n\n" unless they end with it, REVISE, "\n\n", the teacher's text; decoded
            # as one stream.
            student_text = tok.decode(student_ids, skip_special_tokens=True)
            revise = ("\n\n" if student_text and not student_text.endswith("\n\n") else "") + "However,\n\n"
            revise_ids = tok(revise, add_special_tokens=False)["input_ids"]
            assert _ids(record, "revise") == revise_ids
            assert record["response"] == tok.decode(student_ids + revise_ids + teacher, skip_special_tokens=True)
            assert record["safe_prefix_tokens"] == want["safe"]
            COVERAGE.add("breach at step 1" if want["breach"] == 1 else "breach after several steps")
            if want["root"] < want["breach"]:
                COVERAGE.add("root cause before the breaching step")
        else:
            assert record["response"] == tok.decode(student_ids, skip_special_tokens=True)
            COVERAGE.add("no breach")
        COVERAGE.update(_classify(tok, want["steps"], delimiter))
        COVERAGE.add({"eos": "end of sequence", "length": "trajectory budget",
                      "teacher_budget": "teacher budget"}[want["finish"]])


def test_reference_cases_cover_every_situation():
    required = {"breach at step 1", "breach after several steps", "root cause before the breaching step",
                "no breach", "delimiter split over tokens", "delimiter completed inside a token",
                "end of sequence", "trajectory budget", "teacher budget"}
    if len(COVERAGE) == 0:
        pytest.skip("run together with test_motab_equals_reference")
    assert required <= COVERAGE, required - COVERAGE


@pytest.mark.parametrize("gamma", [pytest.param(0.6, marks=pytest.mark.slow), 0.9])
def test_skd_step_equals_reference(gamma):
    student, teacher, tok = _models()
    records = _run("skd_step", gamma=gamma, delimiter="the")
    settings = ref.Settings(delimiter="the", eos=(EOS,), step_cap=10, traj_cap=60, teacher_min_budget=6)
    S, T = ref.Forward(student), ref.Forward(teacher)
    total = 0
    for question, record in zip(_questions(), records):
        want = ref.skd_step(S, T, tok, tok(question["problem"])["input_ids"], settings, gamma)
        assert _generated(record) == want["tokens"]
        assert record["interventions"] == want["interventions"]
        total += want["interventions"]
    assert total >= 2  # the teacher really rewrote steps


def test_teacher_only_and_student_only_equal_plain_decoding():
    student, teacher, tok = _models()
    settings = ref.Settings(delimiter="the", eos=(EOS,), step_cap=10, traj_cap=60, teacher_min_budget=6)
    T = ref.Forward(teacher)
    for question, record in zip(_questions(), _run("teacher_only", delimiter="the")):
        assert _generated(record, "teacher") == ref.teacher_only(T, tok(question["problem"])["input_ids"], settings)
        assert record["tokens"]["student"] == 0
    prompts = [tok(q["problem"])["input_ids"] for q in _questions()]
    plain = motab_jax.generate(student, tok, prompts, temperature=0, max_new_tokens=60, stop_tokens=[EOS])
    for completions, record in zip(plain, _run("student_only", delimiter="the")):
        assert _generated(record, "student") == completions[0].token_ids
        assert record["teacher_forwards"] == 0 and all(s["value"] is None for s in record["steps"])


def test_root_cause_rule():
    values = jnp.asarray([[0.9, 0.8, 0.3, 0.25, 0.1], [0.5, 0.6, 0.1, 0.0, 0.0], [0.2, 0.0, 0.0, 0.0, 0.0]])
    # deltas row 0: -0.1, -0.5, -0.05, -0.15 -> step 3; row 1 with t=2: +0.1 -> step 2; t=1 -> 1.
    assert root_cause(values, jnp.asarray([5, 2, 1])).tolist() == [3, 2, 1]


def test_delimiter_automaton_matches_text_search():
    rng = np.random.default_rng(0)
    alphabet = [b".", b"\n", b"a", b".\n", b"\n\n", b".\n\n", b"x.\n\ny", b"\n.", b"..\n"]
    tables = build_delimiter_tables(alphabet, ".\n\n")
    for _ in range(300):
        tokens = rng.integers(0, len(alphabet), size=12)
        state, text, ends = 0, b"", []
        for t in tokens:
            ends.append(bool(tables.completes[state, t]))
            state = int(tables.next_state[state, t])
        # Reference: split the stream into steps greedily by searching the text.
        expected, text = [], b""
        for t in tokens:
            text += alphabet[t]
            hit = b".\n\n" in text
            expected.append(hit)
            if hit:
                text = b""
        assert ends == expected


def test_delimiter_tables_on_real_qwen_vocabulary():
    tok = motab_jax.text.qwen_tokenizer("qwen3")
    table = token_bytes_table(tok)
    tables = build_delimiter_tables(table, ".\n\n")
    ids = tok(".\n\nNext")["input_ids"]
    assert tables.completes[0, ids[0]]  # ".\n\n" is a single Qwen token (id 382)
    split = tok("end.\n\n", add_special_tokens=False)["input_ids"]
    state = 0
    for i in split:
        done = tables.completes[state, i]
        state = tables.next_state[state, i]
    assert done


@pytest.mark.slow  # 2 x 2048 trajectories; accept_drafts' distribution is tested fast in test_scheduler.py
def test_speculative_teacher_sampling_has_the_teacher_distribution():
    """teacher_only at temperature 1 goes through draft + rejection sampling; its first two tokens must
    follow the teacher's own distribution (chi-square), with greedy and with sampled student drafts."""
    student, teacher, tok = _models()
    prompt = tok("the cat")["input_ids"]
    logits = np.asarray(teacher(jnp.asarray([prompt], jnp.int32)))[0, -1].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    for draft_temperature in (0.0, 1.0):
        cfg = dict(BASE, policy="teacher_only", temperature=1.0, teacher_temperature=1.0, top_p=1.0,
                   draft_temperature=draft_temperature, traj_cap=2, teacher_min_budget=1, num_slots=512,
                   samples_per_question=2048, draft_len=4, seed=3)
        records = list(motab_jax.synthesize(student, teacher, tok, [{"id": "q", "problem": "the cat"}], cfg,
                                            progress=False))
        firsts = np.asarray([_generated(r, "teacher")[0] for r in records])
        assert _chi_square_pvalue(np.bincount(firsts, minlength=TOKENIZER_SIZE), probs) > 1e-3
        top = int(np.bincount(firsts).argmax())
        seconds = np.asarray([_generated(r, "teacher")[1] for r in records if _generated(r, "teacher")[0] == top])
        cond = np.asarray(teacher(jnp.asarray([prompt + [top]], jnp.int32)))[0, -1].astype(np.float64)
        cond = np.exp(cond - cond.max())
        assert _chi_square_pvalue(np.bincount(seconds, minlength=TOKENIZER_SIZE), cond / cond.sum()) > 1e-3
        accepted = sum(r["speculative"]["accepted"] for r in records)
        assert accepted > 0  # the drafts were really used


def _key(records):
    """Everything token-level about a set of records, in a canonical order."""
    return sorted((r["id"], r["sample_index"], r["response"], r["breach_step"], r["root_step"],
                   tuple(s["start"] for s in r["steps"])) for r in records)


def _same_records(a, b):
    """Equal token for token; V and eps equal up to float32 reduction order (batch shapes differ)."""
    assert _key(a) == _key(b)
    order = lambda records: sorted(records, key=lambda r: (r["id"], r["sample_index"]))  # noqa: E731
    for x, y in zip(order(a), order(b)):
        for field in ("value", "eps"):
            np.testing.assert_allclose([s[field] for s in x["steps"]], [s[field] for s in y["steps"]], rtol=1e-5)


def test_refilled_slots_and_sampling_are_slot_independent():
    student, teacher, tok = _models()
    cfg = dict(BASE, policy="motab", delimiter="the", eps0=0.1, theta=1.0, temperature=0.8, teacher_temperature=0.8,
               samples_per_question=2, seed=5)
    few_slots = list(motab_jax.synthesize(student, teacher, tok, _questions(), dict(cfg, num_slots=2), progress=False))
    all_slots = list(motab_jax.synthesize(student, teacher, tok, _questions(), dict(cfg, num_slots=12),
                                          progress=False))
    assert len(few_slots) == 12
    _same_records(few_slots, all_slots)
    other_seed = list(motab_jax.synthesize(student, teacher, tok, _questions(), dict(cfg, num_slots=12, seed=6),
                                           progress=False))
    assert _key(other_seed) != _key(all_slots)


def test_resume_after_interruption(tmp_path):
    student, teacher, tok = _models()
    out = tmp_path / "synth.jsonl"
    cfg = dict(BASE, policy="motab", delimiter="the", eps0=0.1, temperature=0.8, teacher_temperature=0.8,
               samples_per_question=2, seed=5, num_slots=2, output_path=str(out))
    stream = motab_jax.synthesize(student, teacher, tok, _questions(), cfg, progress=False)
    first = [next(stream) for _ in range(5)]
    stream.close()  # the job is killed here
    with open(out, "a") as f:
        f.write('{"id": "q5", "sample_ind')  # and its last line was torn
    rest = list(motab_jax.synthesize(student, teacher, tok, _questions(), cfg, progress=False))
    assert len(first) == 5 and len(rest) == 7
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["id"], r["sample_index"]) for r in lines) == sorted(
        (f"q{i}", j) for i in range(6) for j in range(2))
    uninterrupted = list(motab_jax.synthesize(student, teacher, tok, _questions(), dict(cfg, output_path=""),
                                              progress=False))
    _same_records(lines, uninterrupted)


def test_sharded_engine_equals_unsharded():
    cfg = dict(BASE, policy="motab", delimiter="the", eps0=0.1, theta=1.0, temperature=0.8, teacher_temperature=0.8,
               num_slots=4, samples_per_question=2, seed=9)
    student, teacher, tok = _models()
    plain = list(motab_jax.synthesize(student, teacher, tok, _questions(4), cfg, progress=False))
    s2, t2, _ = _models(mesh_shape=(2, 4))
    assert len(t2.layers.wq[...].sharding.device_set) == 8
    sharded = list(motab_jax.synthesize(s2, t2, tok, _questions(4), cfg, progress=False))
    _same_records(plain, sharded)


def test_input_errors_are_clear():
    student, teacher, tok = _models()
    with pytest.raises(MemoryError, match=r"KV page pools hold \d+ pages .* need at least"):
        list(motab_jax.synthesize(student, teacher, tok, _questions(), dict(BASE, memory_budget_gb=1e-6)))
    with pytest.raises(ValueError, match="max_prompt_len"):
        list(motab_jax.synthesize(student, teacher, tok, [{"id": "long", "problem": "x" * 100}], BASE))
    with pytest.raises(ValueError, match="no 'problem'"):
        list(motab_jax.synthesize(student, teacher, tok, [{"id": "a", "text": "x"}], BASE))
    with pytest.raises(ValueError, match="policy='best'"):
        list(motab_jax.synthesize(student, teacher, tok, _questions(), dict(BASE, policy="best")))
    with pytest.raises(ValueError, match="unknown field 'epsilon'"):
        list(motab_jax.synthesize(student, teacher, tok, _questions(), dict(BASE, epsilon=0.1)))
    with pytest.raises(ValueError, match=r"eps0=1.5: must be in \(0, 1\].*theta=-1: must be >= 0"):
        list(motab_jax.synthesize(student, teacher, tok, _questions(), dict(BASE, eps0=1.5, theta=-1)))


def test_no_stitch_ablation_keeps_only_safe_prefix_and_teacher_text():
    _, _, tok = _models()
    kwargs = dict(delimiter="the", eps0=0.1, theta=1.0)
    stitched, plain = _run("motab", **kwargs), _run("motab_no_stitch", **kwargs)
    breached = 0
    for a, b in zip(stitched, plain):
        assert _ids(a, "teacher") == _ids(b, "teacher") and a["breach_step"] == b["breach_step"]
        if a["breach_step"]:
            breached += 1
            safe = _ids(a, "student")[:a["safe_prefix_tokens"]]
            assert _ids(b, "student") == safe and not any(s["source"] == "revise" for s in b["segments"])
            assert b["response"] == tok.decode(safe + _ids(a, "teacher"), skip_special_tokens=True)
    assert breached >= 2


def test_skd_token_keeps_teacher_top_k_tokens_and_replaces_the_rest():
    student, teacher, tok = _models()
    top_k = 5
    S, T = ref.Forward(student), ref.Forward(teacher)
    replaced = 0
    for question, record in zip(_questions(), _run("skd_token", token_top_k=top_k, delimiter="the")):
        prompt = tok(question["problem"])["input_ids"]
        tokens = _generated(record)
        context = list(prompt)
        for source, token in tokens:
            teacher_logits = T.next_logits(context)
            student_choice = int(np.argmax(S.next_logits(context)))
            in_top = int(np.sum(teacher_logits > teacher_logits[student_choice])) < top_k
            if source == "student":
                assert token == student_choice and in_top
            else:  # the student's token was outside the teacher's top-K: the teacher's (greedy) token instead
                assert not in_top and token == int(np.argmax(teacher_logits))
                replaced += 1
            context.append(token)
        assert record["interventions"] == sum(s == "teacher" for s, _ in tokens)
    assert replaced >= 3
