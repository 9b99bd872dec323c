"""The paged, continuous-batching engine: the dense engine's records reproduced, a pool small enough to preempt,
refills that prefill only the new slots, a full step history ending the trajectory, plain generation equal to
the static sampler, sharding per stage, and the preflight of configs/limo.py on its hardware."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

import motab_jax
from fixtures.make_golden import GOLDEN_DIR
from motab_jax.models.config import ModelConfig
from motab_jax.models.loading import resharded
from motab_jax.models.sharding import DEFAULT_RULES, SAMPLING_RULES, MeshConfig, make_mesh
from motab_jax.motab.driver import EngineStats
from motab_jax.motab.generation import GenerationConfig, generate_rows
from motab_jax.motab.config import resolve_config
from motab_jax.motab.synthesize import cache_length, synthesis_pool
from motab_jax.pipeline.memory import generation_pools
from motab_jax.pipeline.validation import memory_problems
from motab_jax.sampling import make_rule, sample_batch
from test_motab_engine import BASE, EOS, _models, _questions, _same_records

# Records of the dense-cache engine this one replaced (commit f6a36ce), for every policy, greedy and sampled
# (temperature 0.8): written by tests/fixtures/make_dense_records.py from that commit.
DENSE = json.loads((Path(__file__).parent / "fixtures" / "dense_engine_records.json").read_text())
DENSE_SETTINGS = dict(delimiter="the", eps0=0.1, theta=1.0, samples_per_question=2, seed=7)


def _token_view(records):
    return [(r["id"], r["sample_index"], r["response"], [(s["source"], s["token_ids"]) for s in r["segments"]],
             [s["start"] for s in r["steps"]], r["breach_step"], r["root_step"], r["finish_reason"],
             r["interventions"], r["tokens"], r["speculative"], r["teacher_forwards"]) for r in records]


# In the fast set: MOTAB and teacher-only (speculative) greedy and sampled, SKD step-level and student-only greedy;
# the ablations and SKD token-level (also checked against the step-by-step reference in test_motab_engine.py)
# and the other sampled runs are marked slow.
FAST = ("motab@0.0", "motab@0.8", "teacher_only@0.0", "teacher_only@0.8", "skd_step@0.0", "student_only@0.0")


@pytest.mark.parametrize("key", [k if k in FAST else pytest.param(k, marks=pytest.mark.slow) for k in sorted(DENSE)])
def test_records_equal_the_dense_engine(key):
    policy, temperature = key.split("@")
    student, teacher, tok = _models()
    t = float(temperature)
    cfg = dict(BASE, policy=policy, temperature=t, teacher_temperature=t, draft_temperature=t, **DENSE_SETTINGS)
    records = sorted(motab_jax.synthesize(student, teacher, tok, _questions(), cfg, progress=False),
                     key=lambda r: (r["id"], r["sample_index"]))
    assert _token_view(records) == _token_view(DENSE[key])
    for got, want in zip(records, DENSE[key]):
        for field in ("value", "eps", "entropy"):
            np.testing.assert_allclose([np.nan if s[field] is None else s[field] for s in got["steps"]],
                                       [np.nan if s[field] is None else s[field] for s in want["steps"]], atol=1e-5)


def _sampled(**overrides):
    cfg = dict(BASE, policy="motab", delimiter="the", eps0=0.1, theta=1.0, temperature=0.8, teacher_temperature=0.8,
               samples_per_question=2, seed=5, page_size=4, **overrides)
    student, teacher, tok = _models()
    stats = EngineStats()
    records = list(motab_jax.synthesize(student, teacher, tok, _questions(), cfg, progress=False, stats=stats))
    return records, stats


def test_a_pool_that_preempts_gives_the_records_of_a_large_pool_and_refills_prefill_only_new_slots():
    large, large_stats = _sampled(iterations_per_sync=1, max_prompt_len=8)
    minimum = large_stats.pool.min_pages  # one trajectory of 140 positions + 2 prompts: 40 pages of 4
    small, small_stats = _sampled(iterations_per_sync=1, max_prompt_len=8, num_pages=minimum)
    assert small_stats.preemptions >= 2 and large_stats.preemptions == 0
    assert len(small) == len(large) == 12  # nothing lost, nothing duplicated
    assert len({(r["id"], r["sample_index"]) for r in small}) == 12
    _same_records(small, large)
    with pytest.raises(MemoryError, match=f"need at least {minimum}"):
        _sampled(max_prompt_len=8, num_pages=minimum - 1)
    # Refills: each prefill computes the slots it starts (padded to a power of two), never all of them.
    shapes = large_stats.prefill_shapes
    assert shapes[0] == (3, 4, 64) and sum(started for started, _, _ in shapes) == 12
    assert all(rows == 1 << (started - 1).bit_length() for started, rows, _ in shapes)
    assert any(started == 1 for started, _, _ in shapes)


def test_a_full_step_history_ends_the_trajectory_with_its_own_reason():
    student, teacher, tok = _models()
    cfg = dict(BASE, policy="motab", eps0=1e-9, step_cap=2, traj_cap=40, max_steps=4, delimiter="\x00never")
    for record in motab_jax.synthesize(student, teacher, tok, _questions(2), cfg, progress=False):
        assert record["finish_reason"] == "max_steps"
        assert [s["start"] for s in record["steps"]] == [0, 2, 4, 6]
        assert record["tokens"]["student"] == 8 and not record["breach_step"]


def test_plain_generation_equals_the_static_sampler():
    student, _, tok = _models()
    prompts = [tok(q["problem"])["input_ids"] for q in _questions()]
    prompts[2] = prompts[2] * 3  # ragged
    for temperature in (0.0, 0.8):
        rule = make_rule(temperature, 0.95)
        static = sample_batch(student, prompts, list(range(len(prompts))), rule=rule, max_new_tokens=30,
                              stop_tokens=[EOS], seed=4)
        stats = EngineStats()
        rows = dict(generate_rows(student, prompts, list(range(len(prompts))), rule=rule, max_new_tokens=30,
                                  stop_tokens=[EOS], seed=4, config=GenerationConfig(num_slots=2), stats=stats))
        assert stats.started == len(prompts)  # 2 slots, 6 rows: continuous batching refilled them
        for r in range(len(prompts)):
            n = int(static.num_generated[r])
            assert rows[r].tokens.tolist() == static.tokens[r, :n].tolist()
            assert rows[r].hit_stop == bool(static.hit_stop[r])
            np.testing.assert_allclose(rows[r].logprobs, static.logprobs[r, :n], atol=1e-4)


def test_decoding_stages_shard_weights_and_pools_over_the_mesh_and_results_equal_one_device():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sampled, tok = motab_jax.load(GOLDEN_DIR / "qwen3_untied", dtype="float32", mesh=mesh, rules=SAMPLING_RULES)
    trained, _ = motab_jax.load(GOLDEN_DIR / "qwen3_untied", dtype="float32", mesh=mesh, rules=DEFAULT_RULES)
    plain, _ = motab_jax.load(GOLDEN_DIR / "qwen3_untied", dtype="float32")
    # Generation: heads split within a group of fsdp x tensor devices (tensor parallel), the contracted embedding
    # dimension never split; the weights are replicated over data (one copy per engine group).
    spec = sampled.layers.wq[...].sharding.spec
    assert spec[1] is None and spec[2] == ("tensor", "fsdp")  # 4 heads over 2 x 2 devices
    assert tuple(sampled.layers.w_up[...].sharding.spec) == (None, None, ("tensor", "fsdp"))
    assert trained.layers.wq[...].sharding.spec[1] == "fsdp"  # training keeps ZeRO-3 sharding of the embedding
    prompts = [tok(q["problem"])["input_ids"] for q in _questions()]
    rule = make_rule(0.8)
    stats = EngineStats()
    sharded = dict(generate_rows(sampled, prompts, list(range(6)), rule=rule, max_new_tokens=20, stop_tokens=[EOS],
                                 seed=0, config=GenerationConfig(num_slots=3), stats=stats))
    single = dict(generate_rows(plain, prompts, list(range(6)), rule=rule, max_new_tokens=20, stop_tokens=[EOS],
                                seed=0, config=GenerationConfig(num_slots=3)))
    assert {i: r.tokens.tolist() for i, r in sharded.items()} == {i: r.tokens.tolist() for i, r in single.items()}
    # Two engine groups of 2 slots each (3 rounded up); each group's page pool split over its KV heads, the pools
    # of the groups side by side over data: no page is held twice.
    assert stats.pool.groups == 2 and stats.pool.num_slots == 4
    assert tuple(stats.pool_sharding)[:2] == ("tensor", "data")


def test_synthesis_over_engine_groups_equals_one_device():
    """Slots over the mesh's data axis: 2 engine groups of 3 slots (tensor parallel over 2 x 2 devices each), each
    with the smallest pool that runs, so trajectories are preempted; records equal the one-device run's."""
    cfg = dict(BASE, policy="motab", delimiter="the", eps0=0.1, theta=1.0, temperature=0.8, teacher_temperature=0.8,
               samples_per_question=2, seed=5, page_size=4, max_prompt_len=8, iterations_per_sync=1, num_slots=6)
    student, teacher, tok = _models()
    single = list(motab_jax.synthesize(student, teacher, tok, _questions(), cfg, progress=False))
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    on_mesh = [resharded(m, SAMPLING_RULES, mesh) for m in (student, teacher)]
    least = synthesis_pool(resolve_config(cfg), student.config, teacher.config, groups=2).min_pages
    stats = EngineStats()
    grouped = list(motab_jax.synthesize(*on_mesh, tok, _questions(), dict(cfg, num_pages=least), progress=False,
                                        stats=stats))
    assert stats.pool.groups == 2 and stats.pool.slots_per_group == 3 and stats.preemptions >= 1
    assert len(grouped) == 12 and len({(r["id"], r["sample_index"]) for r in grouped}) == 12
    _same_records(grouped, single)
    assert tuple(stats.pool_sharding)[:2] == ("tensor", "data")


GB = 1e9
QWEN3_32B = dict(model_type="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=25600, num_layers=64,
                 num_heads=64, num_kv_heads=8, head_dim=128, max_position_embeddings=40960)
QWEN3_4B = dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36,
                num_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=262144)


@pytest.mark.parametrize("hardware,budget", [("TPU v5p-8", 4 * 95 * GB), ("8 x H100", 8 * 80 * GB)])
def test_limo_synthesis_passes_the_preflight_on_its_hardware(hardware, budget):
    config = importlib.import_module("configs.limo").get_config()
    teacher, student = ModelConfig(**QWEN3_32B), ModelConfig(**QWEN3_4B)
    stages = ["synthesize", "eval"]
    assert memory_problems(config, teacher, student, stages, budget) == [], hardware
    pool = generation_pools(config, teacher, student, (budget, hardware))["synthesize"]
    assert pool.num_slots == 64 and pool.max_len == cache_length(dict(config.synthesis))
    assert pool.min_pages <= pool.num_pages < 64 * pool.pages_per_seq  # more than the least, less than dense
    assert pool.mean_live_tokens > 4096, pool.describe()
    # The dense caches of the engine this replaced would have needed 64 x 35K positions of both models.
    dense = 64 * pool.max_len * pool.token_bytes
    assert dense > budget
    # A budget below one trajectory plus the other slots' prompts is refused with the arithmetic.
    problems = memory_problems(config, teacher, student, stages, 80 * GB)
    assert any(p.startswith("memory: stage synthesize needs at least") and "KV page pools, the least that runs"
               in p for p in problems), problems
