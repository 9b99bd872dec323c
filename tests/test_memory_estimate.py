"""The preflight memory estimate: closed-form activation bytes, remat ordering, refusals with their
arithmetic, and the formula against XLA's own temp-buffer figure for a compiled train step."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import base
from motab_jax.models.config import ModelConfig
from motab_jax.pipeline import preflight
from motab_jax.pipeline.memory import memory_breakdown, training_activation_bytes

TINY = ModelConfig(model_type="llama", vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                   num_kv_heads=1, head_dim=4)
# Qwen2.5-1.5B's shape (tied embeddings, q/k/v biases).
QWEN_1_5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                 num_heads=12, num_kv_heads=2, head_dim=128, qkv_bias=True, tie_word_embeddings=True)
GB80 = 80e9 / 2**30  # an "80 GB" GPU, in GiB


def test_closed_form_for_a_tiny_config():
    # float32 (c = 4), 1 row of 16 tokens, chunk 8: D=8, Q=8, KV=4, head_dim=4, F=16, H=2, L=2, V=32.
    c, d, q, kv, dh, f, h, t, layers = 4, 8, 8, 4, 4, 16, 2, 16, 2
    common = c * d + 2 * (4 * d + 2 * c * d) + c * (2 * q + 3 * kv) + 4 * c * dh + 6 * c * f  # 784 per token
    flash_layer = common + c * q + 4 * h  # + output and log-sum-exp
    dense_layer = common + 2 * 4 * h * t + c * q  # + float32 scores and exponentials, output
    loss = 1 * 8 * 32 * 4 * 3  # [rows, C, V] float32 x 3 buffers for cross-entropy
    other = t * (3 * c * d + 4 * d + 8 * dh)
    full = layers * t * c * d + t * flash_layer + loss + other
    assert (flash_layer, full) == (824, 19840)
    assert training_activation_bytes(TINY, 1, t, "full", "splash", compute_bytes=4, chunk_size=8) == full
    none_dense = layers * t * dense_layer + 1 * h * t * t * 4 + loss + other  # + the scores' cotangent
    assert none_dense == 41984
    assert training_activation_bytes(TINY, 1, t, "none", "xla", compute_bytes=4, chunk_size=8) == none_dense


@pytest.mark.parametrize("impl", ["pallas_gpu", "xla"])
def test_remat_policies_order_and_dense_scores_cost_more(impl):
    cfg = ModelConfig(**QWEN_1_5B)

    def act(remat: str, attention: str = impl) -> float:
        return training_activation_bytes(cfg, 1, 8192, remat, attention, compute_bytes=2, chunk_size=512,
                                         weight_cast=True)

    assert act("full") < act("dots_no_batch") <= act("dots") < act("none")
    assert act("full", "xla") > act("full", "pallas_gpu")
    # Twice the rows, twice the per-token activations (the loss chunk too).
    assert training_activation_bytes(cfg, 2, 8192, "full", impl, compute_bytes=2, chunk_size=512) == pytest.approx(
        2 * training_activation_bytes(cfg, 1, 8192, "full", impl, compute_bytes=2, chunk_size=512), rel=1e-3)


def _sft_config(remat: str, impl: str) -> ml_collections.ConfigDict:
    config = base.get_config()
    config.stages = "sft"
    for role in ("teacher", "student"):
        spec = config[role]
        spec.tokenizer, spec.dtype, spec.remat, spec.attention_impl = "byte_level", "bfloat16", remat, impl
        spec.init = ml_collections.ConfigDict(QWEN_1_5B)
    config.sft.update(dict(global_batch_size=1, micro_batches=1, seq_len=32768, cutoff_len=32768))
    config.synthesis.memory_budget_gb = GB80
    return config


def test_32k_sft_of_a_1_5b_model_fits_80gb_only_with_remat_and_flash_attention():
    assert preflight(_sft_config("full", "pallas_gpu")) == []
    problems = [p for p in preflight(_sft_config("none", "xla")) if p.startswith("memory:")]
    assert len(problems) == 1, problems
    number = r"([\d.]+) GiB"
    match = re.match(rf"memory: stage sft needs at least {number} \(parameters and optimizer state "
                     rf"\(16 B x 1.54e\+09\): {number} \+ activations \(remat=none, attention xla, "
                     rf"1 x 32768 tokens per micro-batch\): "
                     rf"{number} = {number}\) but 74.51 GiB are available", problems[0])
    assert match, problems[0]
    total, state, acts, total_again = map(float, match.groups())
    assert state == pytest.approx(16 * ModelConfig(**QWEN_1_5B).num_params / 2**30, abs=0.01)
    assert total == total_again == pytest.approx(state + acts, abs=0.02)
    # remat alone is not enough at 32K when the kernel materialises [T, T] float32 scores (48 GiB each).
    assert any(p.startswith("memory: stage sft") for p in preflight(_sft_config("full", "xla")))


def test_kd_counts_the_teacher_and_its_forward():
    config = _sft_config("full", "pallas_gpu")
    cfg = ModelConfig(**QWEN_1_5B)
    parts = memory_breakdown(config, cfg, cfg)
    assert parts["kd"]["teacher parameters"] == 2 * cfg.num_params
    assert parts["kd"]["teacher forward"] > 0 and sum(parts["kd"].values()) > sum(parts["sft"].values())


@pytest.mark.parametrize("remat,impl", [("none", "xla"), ("dots_no_batch", "xla"), ("full", "xla")])
def test_estimate_tracks_xla_temp_buffers_of_a_compiled_train_step(remat, impl):
    """On CPU, float32: XLA's temp buffers of the whole jitted step = activations + one float32 gradient
    buffer (state and batch are arguments, not temps). The estimate should be within 0.5x-2x."""
    from motab_jax.models.loading import init_random
    from motab_jax.train.optimizer import OptimizerConfig, make_optimizer
    from motab_jax.train.step import StepConfig, init_train_state, make_train_step

    rows, length, chunk = 2, 256, 128
    cfg = ModelConfig(model_type="llama", vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=64, remat=remat, attention_impl=impl)
    tx, _ = make_optimizer(OptimizerConfig(), 10)
    graphdef, state = init_train_state(init_random(cfg), tx)
    step = make_train_step(graphdef, tx, StepConfig(chunk_size=chunk))
    batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32) for k in ("tokens", "targets", "segment_ids",
                                                                          "positions")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((rows, length), jnp.float32)
    temp = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    estimate = training_activation_bytes(cfg, rows, length, remat, impl, compute_bytes=4, chunk_size=chunk)
    estimate += 4 * cfg.num_params
    assert 0.5 < estimate / temp < 2.0, (estimate, temp)


# ------------------------------------------------------------------------------ text-level synthesis (cross path)
# Llama-3.2-3B-Instruct's shape (tied embeddings).
LLAMA3P2_3B = dict(model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28,
                   num_heads=24, num_kv_heads=8, head_dim=128, tie_word_embeddings=True)


def test_the_token_ratio_is_the_measured_one_on_math_500():
    """Teacher tokens per student token on the bundled MATH-500 solutions: Qwen (teacher) over Llama 3 (student) is
    1.046 pooled over all 500, 1.40 on the worst solution (../shared/CROSS_TOKENIZER.md section 2, measured with
    the released tokenizers); a tokenizer against itself is 1."""
    from motab_jax.models.factory import make_tokenizer
    from motab_jax.motab.cross_sizing import BUNDLED_SOURCE, measure_token_ratio, ratio_texts

    qwen, llama = make_tokenizer("qwen3"), make_tokenizer("llama3")
    source, texts = ratio_texts([], n=500)
    assert source == BUNDLED_SOURCE and len(texts) == 500
    ratio = measure_token_ratio(llama, qwen, texts, source)
    assert ratio.pooled == pytest.approx(1.046, abs=5e-4) and ratio.worst == pytest.approx(1.40, abs=5e-3)
    assert measure_token_ratio(qwen, qwen, texts[:8], source).for_caches == 1.0
    # The job's own solutions when its questions carry them.
    source, texts = ratio_texts([{"problem": "p", "solution": "x = 12345"}, {"problem": "q"}])
    assert texts == ["x = 12345"] and "the job's first 1 questions" in source


def _cross_config(budget_gb: float) -> ml_collections.ConfigDict:
    """The demo with a Qwen-vocabulary teacher and the byte-level student (as tests/test_run.py's cross pair)."""
    from configs import demo

    config = demo.get_config()
    config.teacher.path = config.student.path = ""  # randomly initialised: the shapes of `init`, the tokenizer chosen
    config.teacher.tokenizer = "qwen3"
    config.teacher.init.vocab_size = 151669
    config.stages, config.policies = "synthesize,sft,eval", "motab"
    config.synthesis.memory_budget_gb = budget_gb
    return config


def test_the_preflight_reports_the_text_paths_ratio_and_slots_and_refuses_when_none_fits(caplog):
    """A teacher with another tokenizer: the preflight measures the token ratio on the job's questions (the demo's
    carry solutions), reports the slots `cross_sizing` gives (the engine's own rule) and refuses a budget where not
    even one slot fits, before any weights load."""
    import logging

    from motab_jax.models.factory import make_tokenizer
    from motab_jax.motab.cross_sizing import measure_token_ratio, plan_text_path
    from motab_jax.pipeline.demo_data import write_demo_data
    from motab_jax.jsonl import read_jsonl

    config = _cross_config(16.0)  # over the demo's 8 engine groups (mesh.data = -1 on 8 host devices)
    with caplog.at_level(logging.INFO, logger="motab_jax"):
        assert preflight(config) == []
    log = caplog.text
    demo_rows = read_jsonl(write_demo_data(str(_tmp_dir()), train=32, held_out=0, seed=config.seed)["train"])
    want = measure_token_ratio(make_tokenizer("byte_level"), make_tokenizer("qwen3"),
                               [r["solution"] for r in demo_rows], "demo")
    assert 0.2 < want.for_caches < 0.8  # byte-level student: several bytes per Qwen token
    assert f"sized for {want.for_caches:.3f}" in log and "the job's first 32 questions" in log
    match = re.search(r"text-level synthesis runs (\d+) of (\d+) slots in each of 8 engine groups: each slot holds "
                      r"([\d.e-]+) GiB .*\(student (\d+) \+ teacher (\d+) positions\)", log)
    assert match, log
    slots, wanted, _, student_len, teacher_len = map(float, match.groups())
    s = config.synthesis
    assert wanted == s.num_slots / 8 and student_len == 64 * -(-s.max_prompt_len // 64) + s.traj_cap + 2
    assert teacher_len == -(-want.for_caches * student_len // 1) + max(s.teacher_min_budget, s.traj_cap)
    # A budget the weights nearly fill: not even one slot, refused with the arithmetic.
    caplog.clear()
    teacher_cfg, student_cfg = (ModelConfig(**dict(config[r].init)) for r in ("teacher", "student"))
    weights = (teacher_cfg.num_params + student_cfg.num_params) * 4 / 2**30  # the demo's float32 weights
    plan = plan_text_path(dict(s), student_cfg, teacher_cfg, want.for_caches, wanted=s.num_slots, free_bytes=1.0,
                          where="")
    config = _cross_config(8 * (weights + 0.5 * plan.slot_bytes / 2**30))
    problems = [p for p in preflight(config) if p.startswith("memory: stage synthesize")]
    assert len(problems) == 1 and re.match(r"memory: stage synthesize: text-level synthesis needs [\d.e-]+ GiB of KV "
                                           r"pages per slot \(student \d+ \+ teacher \d+ positions", problems[0])


def _tmp_dir():
    import tempfile

    return tempfile.mkdtemp()


@pytest.mark.parametrize("pair", ["gptoss120b_to_qwen3_4b", "qwen3_32b_to_llama3p2_3b"])
def test_the_paper_pairs_text_path_fits_a_v5p_8_and_not_two_80gb_gpus(pair):
    """The released shapes with the measured ratios (MATH-500, 32 solutions: o200k/Qwen 1.05 on the worst text,
    Qwen/Llama 3 1.21): on a TPU v5p-8 (4 x 95 GB) the text path runs every slot at the paper's lengths (32K
    trajectories), its page pools holding about a fifth of every slot's full capacity (admission by pages, preemption
    when they run dry); 2 x 80 GB do not hold the 120b teacher at all."""
    import importlib

    from motab_jax.motab.cross_sizing import TokenRatio
    from motab_jax.pipeline.memory import text_path_plan
    from motab_jax.pipeline.validation import memory_problems
    from test_engine_paged import QWEN3_4B, QWEN3_32B
    from test_gpt_oss import _released

    config = importlib.import_module(f"configs.{pair}").get_config()
    if pair.startswith("gptoss"):
        teacher, student, ratio = _released(36, 128), ModelConfig(**QWEN3_4B), TokenRatio(0.965, 1.050, 32, "MATH-500")
    else:
        teacher, student = ModelConfig(**QWEN3_32B), ModelConfig(**LLAMA3P2_3B)
        ratio = TokenRatio(1.050, 1.212, 32, "MATH-500")
    v5p_8 = 4 * 95e9
    assert memory_problems(config, teacher, student, ["synthesize", "eval"], v5p_8, ratio) == []
    plan = text_path_plan(config, teacher, student, ratio, v5p_8)
    # Every slot runs; the pools hold about a fifth of every slot's full capacity (the earlier rule's dozen slots).
    assert plan.slots == config.synthesis.num_slots and 0.15 < plan.capacity_share < 0.25, plan.describe()
    assert plan.student_len == 2048 + 32768 + 2 and plan.teacher_len == -(-ratio.worst * plan.student_len // 1) + 32768
    # Twice the pages with twice the memory left after the weights (up to rounding).
    more = text_path_plan(config, teacher, student, ratio, v5p_8 + plan.free_bytes)
    assert abs(more.student_pages - 2 * plan.student_pages) <= 2 and abs(more.teacher_pages - 2 * plan.teacher_pages) <= 2
    if pair.startswith("gptoss"):
        problems = memory_problems(config, teacher, student, ["synthesize"], 2 * 80e9, ratio)
        assert problems and problems[0].startswith("memory: stage synthesize: text-level synthesis needs")
