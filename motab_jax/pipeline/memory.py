"""The preflight's memory model: what each stage needs at its peak (parameters, KV caches, optimizer
state, activations), from the models' configs and the run configuration alone (no weights are read)."""

from __future__ import annotations

from typing import Any

import jax

from motab_jax.models.config import ModelConfig
from motab_jax.models.sharding import MeshConfig
from motab_jax.motab.cross_sizing import TextPathPlan, TokenRatio, plan_text_path
from motab_jax.motab.pool import GIB, PoolPlan, memory_over_devices, plan_pool
from motab_jax.motab.synthesize import kv_token_bytes, synthesis_pool
from motab_jax.sampling.sampler import bucket

# Bytes per element of what the estimate counts outside the compute dtype: float32 statistics, scores, logits.
_F32 = 4
# Float32 [rows, C, V] buffers the chunked loss holds at once while one chunk is differentiated: "ce"
# recomputes the logits, their softmax and the logits' cotangent; a divergence holds student and teacher
# logits, both log-softmaxes, the student's probabilities and the cotangent (see train/losses.py).
_LOSS_BUFFERS = {"ce": 3, "divergence": 6}
DENSE_ATTENTION = ("xla", "jax")  # resolved kernels that materialise [T, S] float32 scores per head


def _layer_bytes_no_remat(cfg: ModelConfig, seq_len: int, c: int, attention_impl: str) -> float:
    """Bytes per token that one decoder layer keeps for its backward pass without remat: JAX's saved
    residuals of `decoder_layer` (`jax.ad_checkpoint.print_saved_residuals`), less what XLA fuses away."""
    d, f, dh, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads
    q, kv = h * dh, cfg.num_kv_heads * dh
    total = c * d  # the layer's input: the scan carry
    total += 2 * (_F32 * d + 2 * c * d)  # two RMSNorms: float32 copy of the input, normalised and weighted outputs
    total += c * (2 * q + 3 * kv) + 4 * c * dh  # q, k, v projections, RoPE'd q and k, the cos/sin tables' casts
    # gate and up projections, silu's internals (3) and silu(gate) * up (w_down's input); a mixture of experts
    # does this once per routed expert, plus the router's logits
    total += 6 * c * f * max(cfg.experts_per_token, 1) + c * cfg.num_experts
    if attention_impl in DENSE_ATTENTION:
        # Masked scores and their exponentials in float32 per (head, key); XLA recomputes the mask and the
        # cast probabilities from them; plus the attention output (w_o's input).
        total += 2 * _F32 * h * seq_len + c * q
    else:
        # Flash kernels keep their output and the float32 log-sum-exp per head; pallas_gpu also keeps the
        # K/V it was given, repeated over each GQA group.
        total += c * q + _F32 * h + (2 * c * (q - kv) if attention_impl == "pallas_gpu" else 0)
    return total


def training_activation_bytes(cfg: ModelConfig, rows: int, seq_len: int, remat: str, attention_impl: str, *,
                              compute_bytes: int, chunk_size: int, divergence: bool = False,
                              weight_cast: bool = False) -> float:
    """Peak activation bytes of one micro-batch's forward + backward pass (`rows` packed rows of `seq_len`).

    With N = rows * seq_len tokens, L layers, c = compute-dtype bytes, D hidden, Q = heads * head_dim,
    KV = kv_heads * head_dim, F mlp, H heads, V vocabulary, C = min(chunk_size, seq_len):

        saved  = L * N * s(remat)                     what the layer scan keeps for the backward pass
        redo   = N * r  (0 under remat="none")        one layer recomputed and differentiated at a time
        dense  = rows * H * seq_len^2 * 4             dense kernels ("xla", "jax") only: the float32 scores'
                                                      cotangent of the layer being differentiated (the
                                                      scores themselves are in s and r)
        loss   = rows * C * V * 4 * b  (+ c V D when the head weight is cast), b = 3 for "ce", 6 for KD
        other  = N * (3 c D + 4 D + 8 head_dim)       embedding output, final norm, the loss's hidden copy
                                                      and its cotangent, float32 RoPE tables

    s(remat) per token and layer:
        full           c D                            only the layer input (the scan carry)
        dots_no_batch  c (2D + Q + 2KV + 2F)           + the outputs of the projections (no batch dims):
                                                      q, k, v, w_o (to recompute the residual), gate, up
        dots           dots_no_batch + 4 (H T + Q)     + the attention einsums (batch dims), float32, when dense
        none           r                              every residual, `_layer_bytes_no_remat`:
                                                      c (5D + 3Q + 3KV + 4 head_dim + 6F) + 8D, plus 8 H T
                                                      for dense kernels (scores and exponentials, float32)
                                                      or 4 H (+ 2c (Q - KV) for pallas_gpu) for flash ones
    Under remat="none" the backward frees each layer's residuals as it goes, so there is no recompute term.
    Weight casts (param dtype != compute dtype): under remat="none" every layer's cast weights are
    residuals (c bytes per layer parameter), otherwise one layer's at a time.

    Checked against XLA's temp buffers of the compiled float32 step on CPU (tests/test_memory_estimate.py):
    0.94x-1.45x over remat policies, dense and flash kernels.

    The figure is summed over devices (the batch is split over data x fsdp); with tensor parallelism some
    activations are replicated across the tensor axis, so it is then a lower bound.
    """
    c = compute_bytes
    d, f, dh, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads
    q, kv = h * dh, cfg.num_kv_heads * dh
    tokens = rows * seq_len
    dense = attention_impl in DENSE_ATTENTION
    per_layer = _layer_bytes_no_remat(cfg, seq_len, c, attention_impl)
    saved = {
        "none": per_layer,
        "full": c * d,
        "dots_no_batch": c * (2 * d + q + 2 * kv + 2 * f),
        "dots": c * (2 * d + q + 2 * kv + 2 * f) + (_F32 * (h * seq_len + q) if dense else 0),
    }[remat]
    total = cfg.num_layers * tokens * saved
    if remat != "none":
        total += tokens * per_layer
    if dense:
        total += rows * h * seq_len * seq_len * _F32
    layer_params = (cfg.num_params - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
                    - cfg.hidden_size)
    if weight_cast:
        total += c * (layer_params if remat == "none" else layer_params / cfg.num_layers)
    total += loss_buffer_bytes(cfg, rows, seq_len, chunk_size, divergence=divergence,
                               compute_bytes=c if weight_cast else 0)
    total += tokens * (3 * c * d + _F32 * d + 2 * _F32 * dh)
    return float(total)


def loss_buffer_bytes(cfg: ModelConfig, rows: int, seq_len: int, chunk_size: int, *, divergence: bool,
                      compute_bytes: int = 0) -> float:
    """The chunked loss's peak: float32 [rows, C, V] buffers of one chunk (C = chunk_size, or the whole row
    when chunk_size <= 0), plus a compute-dtype copy of the LM head when `compute_bytes` (weights cast)."""
    chunk = min(chunk_size, seq_len) if chunk_size > 0 else seq_len
    buffers = _LOSS_BUFFERS["divergence" if divergence else "ce"]
    return float(rows * chunk * cfg.output_vocab_size * _F32 * buffers
                 + compute_bytes * cfg.output_vocab_size * cfg.hidden_size)


def inference_activation_bytes(cfg: ModelConfig, rows: int, seq_len: int, attention_impl: str, *,
                               compute_bytes: int) -> float:
    """Peak of a gradient-free forward (the KD teacher): one layer's intermediates at a time (bounded by
    what the layer would save for a backward pass, dense scores included) plus the hidden states [N, D]
    it hands to the loss."""
    per_token = _layer_bytes_no_remat(cfg, seq_len, compute_bytes, attention_impl) + compute_bytes * cfg.hidden_size
    return float(rows * seq_len * per_token)


def _resolved_attention(spec: Any, cfg: ModelConfig, seq_len: int) -> str:
    """The kernel training rows (packed, with segment ids, no cache) get on this backend."""
    from motab_jax.models.attention import resolve_impl

    if cfg.attention_sinks or cfg.has_windows:
        return "xla"  # sinks and windows run the XLA reference (models.attention)
    return resolve_impl(str(spec.get("attention_impl", "auto")), self_attention=True, segmented=True, length=seq_len,
                        head_dim=cfg.head_dim, dtype=jax.numpy.dtype(spec.compute_dtype or spec.dtype))


def _cached(cfg: ModelConfig, spec: Any) -> ModelConfig:
    """`cfg` with the compute dtype the run gives it (its KV caches are stored in it)."""
    return cfg.replace(compute_dtype=spec.compute_dtype or spec.dtype)


def engine_groups(config: Any) -> int:
    """Engine groups of the decoding stages: the run's mesh `data` axis (`models.sharding.SAMPLING_RULES`); 1 when
    the mesh does not fit the devices (the validator reports that)."""
    try:
        return MeshConfig(**config.mesh).shape(jax.device_count())[0]
    except ValueError:
        return 1


def _weight_bytes(config: Any, teacher: ModelConfig, student: ModelConfig) -> float:
    """Bytes of one copy of both models' parameters in their dtypes."""
    return (teacher.num_params * jax.numpy.dtype(config.teacher.dtype).itemsize
            + student.num_params * jax.numpy.dtype(config.student.dtype).itemsize)


def generation_pools(config: Any, teacher: ModelConfig, student: ModelConfig,
                     device_bytes: tuple[float, str] | None = None) -> dict[str, PoolPlan]:
    """The KV page pools synthesis and evaluation would get (`motab.pool.plan_pool`, the engine's own rule);
    `device_bytes`: the memory to size them from (default: the devices')."""
    s = dict(config.synthesis)
    groups = engine_groups(config)
    t, st = _cached(teacher, config.teacher), _cached(student, config.student)
    weights = _weight_bytes(config, teacher, student)
    e = config.eval
    return {"synthesize": synthesis_pool(s, st, t, weight_bytes=weights, device_bytes=device_bytes, groups=groups),
            # Evaluation prompts are not known before loading: synthesis.max_prompt_len stands for them.
            "eval": plan_pool(num_slots=int(e.batch_size), page_size=s["page_size"],
                              max_len=bucket(s["max_prompt_len"]) + int(e.max_new_tokens) + 10,
                              max_prompt_len=s["max_prompt_len"], token_bytes=kv_token_bytes([t]),
                              memory_budget_gb=s["memory_budget_gb"], weight_bytes=weights, device_bytes=device_bytes,
                              groups=groups)}


def text_path_plan(config: Any, teacher: ModelConfig, student: ModelConfig, ratio: TokenRatio,
                   have: float) -> TextPathPlan:
    """The page pools per engine group text-level synthesis (a teacher with another tokenizer) would get (slots 0:
    refused): `cross_sizing`'s rule with `num_pages`, or what the weights leave on one group's share of `have`
    bytes (over all devices) or of `memory_budget_gb`."""
    s = config.synthesis
    groups = engine_groups(config)
    budget = float(s.memory_budget_gb) * GIB
    free = (budget or have) / groups - _weight_bytes(config, teacher, student)
    where = (f"memory_budget_gb={s.memory_budget_gb:g}" if budget else f"{format_bytes(have)} over "
             f"{jax.device_count()} device(s)") + (f" / {groups} engine groups" if groups > 1 else "")
    return plan_text_path(dict(s), _cached(student, config.student), _cached(teacher, config.teacher),
                          ratio.for_caches, wanted=-(-int(s.num_slots) // groups), free_bytes=free, where=where,
                          groups=groups)


def _micro_rows(section: Any, rows: int) -> int:
    return max(rows // max(int(section.micro_batches), 1), 1)


def memory_breakdown(config: Any, teacher: ModelConfig, student: ModelConfig,
                     text_ratio: TokenRatio | None = None) -> dict[str, dict[str, float]]:
    """Bytes each stage needs at its peak, summed over devices, by part: parameters in their dtypes and KV
    caches for synthesis (with `text_ratio`, text-level synthesis: the least pools it runs with); for sft /
    kd float32 master weights + AdamW moments + gradients (16 B per parameter) and the activations of one
    micro-batch (`training_activation_bytes`, with the student's remat policy and the attention kernel it
    resolves to), kd also the teacher's weights and forward."""
    def param_bytes(cfg: ModelConfig, spec: Any) -> float:
        return cfg.num_params * jax.numpy.dtype(spec.dtype).itemsize

    def itemsize(spec: Any) -> int:
        return jax.numpy.dtype(spec.compute_dtype or spec.dtype).itemsize

    pools = generation_pools(config, teacher, student)
    synthesis = pools["synthesize"]
    copies = f" x {synthesis.groups} engine groups" if synthesis.groups > 1 else ""

    def least_pools(pool: PoolPlan, token_bytes: int, what: str) -> tuple[str, float]:
        return (f"KV page pools, the least that runs ({pool.min_pages} pages{copies}: {what} of {pool.max_len} "
                f"positions + {pool.slots_per_group - 1} prompts of {pool.max_prompt_len})",
                pool.groups * pool.min_pages * pool.page_size * token_bytes)

    out: dict[str, dict[str, float]] = {"synthesize": dict([
        (f"parameters{copies}", synthesis.groups * (param_bytes(teacher, config.teacher)
                                                    + param_bytes(student, config.student))),
        least_pools(synthesis, synthesis.token_bytes, "one trajectory")])}
    if text_ratio is not None:  # the text path's own pools (`motab.cross_sizing`): the least that runs
        text = text_path_plan(config, teacher, student, text_ratio, 0.0)
        out["synthesize"] = {next(iter(out["synthesize"])): next(iter(out["synthesize"].values())),
                             f"KV page pools of text-level synthesis, the least that runs ({text.student_min} student + "
                             f"{text.teacher_min} teacher pages{copies}: one trajectory at full capacity, student "
                             f"{text.student_len} + teacher {text.teacher_len} positions, + {text.wanted - 1} prompts)":
                             text.groups * text.min_bytes}
    evaluation = pools["eval"]
    out["eval"] = dict([
        (f"parameters (the larger model evaluated){copies}", evaluation.groups * max(
            param_bytes(teacher, config.teacher), param_bytes(student, config.student))),
        least_pools(evaluation, max(kv_token_bytes([_cached(teacher, config.teacher)]),
                                    kv_token_bytes([_cached(student, config.student)])), "one sample")])
    spec = config.student
    # The train step keeps float32 master weights; each layer casts them to the compute dtype.
    cast = itemsize(spec) != 4
    remat = str(spec.get("remat", "none"))
    state = {f"parameters and optimizer state (16 B x {student.num_params:.3g})": 16.0 * student.num_params}

    def activations(rows: int, seq_len: int, impl: str) -> str:
        return f"activations (remat={remat}, attention {impl}, {rows} x {seq_len} tokens per micro-batch)"

    sft = config.sft
    sft_rows, sft_len = _micro_rows(sft, sft.global_batch_size), int(sft.seq_len)
    impl = _resolved_attention(spec, student, sft_len)
    out["sft"] = state | {activations(sft_rows, sft_len, impl): training_activation_bytes(
        student, sft_rows, sft_len, remat, impl, compute_bytes=itemsize(spec), chunk_size=int(sft.chunk_size),
        weight_cast=cast)}
    kd = config.kd
    kd_rows, kd_len = _micro_rows(kd, kd.prompts_per_step * kd.samples_per_prompt), int(kd.seq_len)
    impl = _resolved_attention(spec, student, kd_len)
    out["kd"] = state | {
        "teacher parameters": param_bytes(teacher, config.teacher),
        activations(kd_rows, kd_len, impl): training_activation_bytes(
            student, kd_rows, kd_len, remat, impl, compute_bytes=itemsize(spec), chunk_size=int(kd.chunk_size),
            divergence=True, weight_cast=cast),
        "teacher forward": _teacher_forward_bytes(config, teacher, student, kd_rows, kd_len, remat, impl)}
    return out


def _teacher_forward_bytes(config: Any, teacher: ModelConfig, student: ModelConfig, rows: int, seq_len: int,
                           remat: str, student_impl: str) -> float:
    """What the KD teacher's forward adds to the student's training peak: its hidden states (held through the
    loss) and its one-layer intermediates, which are freed before the student's backward starts. Under remat
    the student's backward recomputes one layer at a time (counted in its activations), so only the part of
    the teacher's transient beyond that recompute adds to the peak."""
    c = jax.numpy.dtype(config.teacher.compute_dtype or config.teacher.dtype).itemsize
    hidden = rows * seq_len * c * teacher.hidden_size
    impl = _resolved_attention(config.teacher, teacher, seq_len)
    transient = inference_activation_bytes(teacher, rows, seq_len, impl, compute_bytes=c) - hidden
    if remat != "none":
        student_c = jax.numpy.dtype(config.student.compute_dtype or config.student.dtype).itemsize
        transient -= rows * seq_len * _layer_bytes_no_remat(student, seq_len, student_c, student_impl)
    return float(hidden + max(transient, 0.0))


def format_bytes(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def available_memory() -> float:
    """Bytes of accelerator memory over all devices; on CPU the host's RAM; 0 when unknown."""
    return memory_over_devices()[0]


def memory_hint(config: Any, stage: str, parts: dict[str, float]) -> str:
    """What would shrink this stage's peak, given the settings the estimate used."""
    if stage in ("synthesize", "eval"):
        return ("a smaller synthesis.num_slots / traj_cap / max_prompt_len (eval: eval.batch_size / max_new_tokens), "
                "fewer engine groups (mesh.data: each holds a copy of the weights) with more tensor / fsdp devices "
                "each, or bfloat16")
    hints = []
    if str(config.student.get("remat", "none")) != "full":
        hints.append("student.remat='full'")
    if any(f"attention {impl}," in name for name in parts for impl in DENSE_ATTENTION):
        hints.append("an attention_impl that does not materialise [T, T] scores (pallas_gpu, cudnn, splash) "
                     "or a sequence length it tiles")
    hints.append(f"more {stage}.micro_batches or a shorter {stage}.seq_len")
    return ", ".join(hints)
