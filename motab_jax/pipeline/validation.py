"""Checking a job's configuration before any heavy work.

`validate_config` checks every field on its own (types, ranges, names, paths) without touching a model.
`preflight` then reads only the two models' config.json and tokenizers (local folders, the hub cache, or the
hub when it is reachable) and checks what needs both: a shared vocabulary, top-k values within it, and a
memory estimate of the largest stage against the devices' memory.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from motab_jax.eval.benchmarks import BENCHMARKS
from motab_jax.models.config import ModelConfig, config_from_hf
from motab_jax.models.factory import init_fields, make_tokenizer, validate_model_spec
from motab_jax.models.sharding import MeshConfig
from motab_jax.motab.synthesize import DEFAULTS as SYNTHESIS_DEFAULTS
from motab_jax.motab.synthesize import cache_bytes_per_slot, cache_length, synthesis_problems
from motab_jax.pipeline.policy_runs import policy_runs
from motab_jax.train.losses import LOSSES
from motab_jax.train.optimizer import optimizer_problems

log = logging.getLogger("motab_jax")

STAGE_NAMES = ("models", "pretrain", "synthesize", "sft", "kd", "eval")
_TRAIN_SECTIONS = ("sft", "kd")


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem found."""


def stages_of(config: Any) -> list[str]:
    return [s.strip() for s in str(config.stages).split(",") if s.strip()]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _training_problems(section: Any, name: str) -> list[str]:
    problems = [f"{name}.{p}" for p in optimizer_problems(section)]

    def need(ok: bool, field: str, rule: str) -> None:
        if field in section and not ok:
            problems.append(f"{name}.{field}={section[field]!r}: must be {rule}")

    def num(field: str) -> float:
        value = section.get(field, 0)
        return value if _is_number(value) else float("nan")

    for field in ("epochs", "micro_batches", "seq_len", "save_every", "keep_last", "chunk_size",
                  "global_batch_size", "prompts_per_step", "samples_per_prompt", "max_new_tokens"):
        need(isinstance(section.get(field), int) and num(field) >= 1, field, "an integer >= 1")
    if "global_batch_size" in section and _is_number(section.get("micro_batches")) and section.micro_batches >= 1 \
            and section.global_batch_size % section.micro_batches:
        problems.append(f"{name}.micro_batches={section.micro_batches} must divide {name}.global_batch_size="
                        f"{section.global_batch_size}")
    if "cutoff_len" in section:
        need(isinstance(section.cutoff_len, int) and section.cutoff_len >= 0, "cutoff_len", ">= 0 (0 = seq_len)")
    return problems


def _kd_problems(kd: Any, runs: list[str] | None, stages: list[str]) -> list[str]:
    problems = []
    if kd.loss not in LOSSES:
        problems.append(f"kd.loss={kd.loss!r}: accepted {sorted(LOSSES)}")
    if kd.loss == "jsd" and not 0 <= kd.beta <= 1:
        problems.append(f"kd.beta={kd.beta!r}: must be in [0, 1] for jsd")
    if kd.loss in ("akl", "skew_kl", "skew_reverse_kl") and not 0 <= kd.alpha <= 1:
        problems.append(f"kd.alpha={kd.alpha!r}: must be in [0, 1] for {kd.loss}")
    if not 0 <= kd.temperature:
        problems.append(f"kd.temperature={kd.temperature!r}: must be >= 0")
    if not 0 < kd.top_p <= 1:
        problems.append(f"kd.top_p={kd.top_p!r}: must be in (0, 1]")
    if _is_number(kd.seq_len) and _is_number(kd.max_new_tokens) and kd.seq_len <= kd.max_new_tokens:
        problems.append(f"kd.seq_len={kd.seq_len} must exceed kd.max_new_tokens={kd.max_new_tokens} (it holds the "
                        "prompt and the rollout)")
    if kd.from_policy and {"sft", "kd"} <= set(stages) and runs is not None and kd.from_policy not in runs:
        problems.append(f"kd.from_policy={kd.from_policy!r}: not among policies {runs} (or '' for the initial "
                        "student)")
    return problems


def _eval_problems(e: Any, demo: bool) -> list[str]:
    problems = []
    for name in (b.strip() for b in str(e.benchmarks).split(",") if b.strip()):
        if name in BENCHMARKS or name.startswith("hub:") or (name == "demo" and demo):
            continue
        if name == "demo":
            problems.append("eval.benchmarks: 'demo' needs data.questions='demo'")
        elif not Path(name).expanduser().is_file():
            problems.append(f"eval.benchmarks: {name!r} is not a known benchmark ({', '.join(BENCHMARKS)}), "
                            "'hub:<owner>/<dataset>' or an existing JSONL file")
    if not str(e.benchmarks).strip():
        problems.append("eval.benchmarks is empty: give e.g. 'math500,aime24'")
    checks = [("samples", e.samples >= 0, ">= 0 (0 = each benchmark's default)"),
              ("temperature", e.temperature >= 0, ">= 0 (0 = greedy)"), ("top_p", 0 < e.top_p <= 1, "in (0, 1]"),
              ("top_k", e.get("top_k", 0) >= 0, ">= 0 (0 = off)"), ("max_new_tokens", e.max_new_tokens >= 1, ">= 1"),
              ("batch_size", e.batch_size >= 1, ">= 1"), ("limit", e.limit >= 0, ">= 0 (0 = all problems)")]
    problems += [f"eval.{f}={e.get(f)!r}: must be {rule}" for f, ok, rule in checks if not ok]
    return problems


def _data_problems(d: Any, stages: list[str]) -> list[str]:
    problems = []
    questions = str(d.questions)
    needs_questions = bool({"pretrain", "synthesize", "kd"} & set(stages))
    if not questions:
        if needs_questions:
            problems.append("data.questions is empty: give a JSONL file with id and problem, 'hf:<id>[@split]', "
                            "'tfds:<name>' or 'demo'")
    elif questions == "demo":
        if d.demo_train < 1 or d.demo_held_out < 1 or d.demo_pretrain < 0:
            problems.append(f"data.demo_train={d.demo_train}, data.demo_held_out={d.demo_held_out}, "
                            f"data.demo_pretrain={d.demo_pretrain}: must be >= 1, >= 1 and >= 0")
    elif not questions.startswith(("hf:", "tfds:")) and not Path(questions).expanduser().exists():
        problems.append(f"data.questions={questions!r}: no such file (or use 'hf:<id>', 'tfds:<name>', 'demo')")
    if d.question_fields and len(str(d.question_fields).split(",")) != 2:
        problems.append(f"data.question_fields={d.question_fields!r}: give 'question_column,solution_column'")
    if d.limit < 0:
        problems.append(f"data.limit={d.limit}: must be >= 0 (0 = all questions)")
    if "pretrain" in stages and questions != "demo":
        problems.append("stages: 'pretrain' trains the demo's models and needs data.questions='demo'")
    return problems


# Stages whose host loop reads device results back (synthesis records, sampled evaluations, probes): they
# need every array addressable from one process, so they run on one host for now.
SINGLE_HOST_STAGES = ("models", "pretrain", "synthesize", "eval")


def multihost_problems(stages: list[str], process_count: int) -> list[str]:
    if process_count == 1:
        return []
    return [f"stages: {s!r} runs on one host only for now ({process_count} processes started); run it on one "
            "host (e.g. --config.stages=synthesize with distributed.num_processes=1), then sft / kd across hosts"
            for s in stages if s in SINGLE_HOST_STAGES]


def validate_config(config: Any) -> list[str]:
    """All problems in `config` (empty when valid), each naming the field and the accepted values."""
    problems: list[str] = []
    stages = stages_of(config)
    if not stages:
        problems.append("stages is empty: give a comma-separated list, e.g. 'synthesize,sft,eval'")
    problems += [f"stages: unknown stage {s!r}; accepted: {', '.join(STAGE_NAMES)}" for s in stages
                 if s not in STAGE_NAMES]
    for name in ("teacher", "student"):
        problems += validate_model_spec(config[name], name)
    try:
        MeshConfig(**config.mesh).shape(jax.device_count())
    except (ValueError, TypeError) as e:
        problems.append(f"mesh: {e}")
    if not str(config.run_dir):
        problems.append("run_dir is empty: give a folder for the job's outputs")
    runs: list[str] | None = None
    try:
        runs = [r.label for r in policy_runs(config)]
        if str(config.policies).strip() and config.synthesis.policy != SYNTHESIS_DEFAULTS["policy"]:
            problems.append(f"synthesis.policy={config.synthesis.policy!r} is ignored because policies="
                            f"{config.policies!r} names the runs: put it in policies, or set policies=''")
    except ValueError as e:
        problems.append(str(e))
    problems += [f"synthesis.{p}" for p in synthesis_problems(config.synthesis.to_dict())]
    problems += _data_problems(config.data, stages)
    for name in _TRAIN_SECTIONS:
        problems += _training_problems(config[name], name)
    if "pretrain" in stages:
        for role in ("teacher", "student"):
            merged = type(config.sft)(config.sft.to_dict() | config.pretrain[role].to_dict())
            problems += _training_problems(merged, f"pretrain.{role}")
    problems += _kd_problems(config.kd, runs, stages)
    problems += _eval_problems(config.eval, str(config.data.questions) == "demo")
    problems += multihost_problems(stages, jax.process_count())
    return problems


# --------------------------------------------------------------------------- preflight: both models


@dataclass(frozen=True)
class ModelFacts:
    role: str
    config: ModelConfig | None  # None: not readable without loading (an unreachable hub id, a .gguf file)
    tokenizer: Any


def _metadata_folder(path: str) -> Path | None:
    """A folder with config.json and the tokenizer files of `path`, without the weights; None if unreachable."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():  # a .gguf file: its metadata comes with the weights
        return None
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "tokenizer*", "*.jinja", "special_tokens_map.json", "generation_config.json",
                "vocab.json", "merges.txt"]
    for local_only in (True, False):
        if not local_only and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            return None
        try:
            return Path(snapshot_download(path, allow_patterns=patterns, local_files_only=local_only))
        except Exception:  # noqa: BLE001 - unreachable or not cached: the models stage reports it when loading
            continue
    return None


def model_facts(spec: Any, role: str) -> ModelFacts:
    if not spec.path:
        return ModelFacts(role, ModelConfig(**init_fields(spec)), make_tokenizer(spec.tokenizer))
    folder = _metadata_folder(str(spec.path))
    if folder is None or not (folder / "config.json").exists():
        return ModelFacts(role, None, None)
    from motab_jax.text import load_tokenizer

    cfg = config_from_hf(json.loads((folder / "config.json").read_text()), source=str(folder / "config.json"))
    try:
        tokenizer = load_tokenizer(folder)
    except (FileNotFoundError, OSError):
        tokenizer = make_tokenizer(spec.tokenizer) if spec.tokenizer else None
    return ModelFacts(role, cfg, tokenizer)


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
    total += 6 * c * f  # gate and up projections, silu's internals (3) and silu(gate) * up (w_down's input)
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

    return resolve_impl(str(spec.get("attention_impl", "auto")), self_attention=True, segmented=True, length=seq_len,
                        head_dim=cfg.head_dim, dtype=jax.numpy.dtype(spec.compute_dtype or spec.dtype))


def _micro_rows(section: Any, rows: int) -> int:
    return max(rows // max(int(section.micro_batches), 1), 1)


def memory_breakdown(config: Any, teacher: ModelConfig, student: ModelConfig) -> dict[str, dict[str, float]]:
    """Bytes each stage needs at its peak, summed over devices, by part: parameters in their dtypes and KV
    caches for synthesis; for sft / kd float32 master weights + AdamW moments + gradients (16 B per
    parameter) and the activations of one micro-batch (`training_activation_bytes`, with the student's
    remat policy and the attention kernel it resolves to), kd also the teacher's weights and forward."""
    def param_bytes(cfg: ModelConfig, spec: Any) -> float:
        return cfg.num_params * jax.numpy.dtype(spec.dtype).itemsize

    def itemsize(spec: Any) -> int:
        return jax.numpy.dtype(spec.compute_dtype or spec.dtype).itemsize

    s = dict(config.synthesis)
    out: dict[str, dict[str, float]] = {"synthesize": {
        "parameters": sum(param_bytes(cfg, spec) for cfg, spec in ((teacher, config.teacher),
                                                                  (student, config.student))),
        "KV caches": sum(s["num_slots"] * cache_bytes_per_slot(cfg, cache_length(s), spec.compute_dtype or spec.dtype)
                         for cfg, spec in ((teacher, config.teacher), (student, config.student)))}}
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


def memory_estimate(config: Any, teacher: ModelConfig, student: ModelConfig) -> dict[str, float]:
    """Total bytes each stage needs at its peak, summed over devices (the sums of `memory_breakdown`)."""
    return {stage: sum(parts.values()) for stage, parts in memory_breakdown(config, teacher, student).items()}


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def available_memory() -> float:
    """Bytes of accelerator memory over all devices; on CPU the host's RAM; 0 when unknown."""
    stats = jax.devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return float(stats["bytes_limit"]) * jax.device_count()
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0.0


def _memory_hint(config: Any, stage: str, parts: dict[str, float]) -> str:
    """What would shrink this stage's peak, given the settings the estimate used."""
    if stage == "synthesize":
        return "a smaller synthesis.num_slots / traj_cap, or bfloat16"
    hints = []
    if str(config.student.get("remat", "none")) != "full":
        hints.append("student.remat='full'")
    if any(f"attention {impl}," in name for name in parts for impl in DENSE_ATTENTION):
        hints.append("an attention_impl that does not materialise [T, T] scores (pallas_gpu, cudnn, splash) "
                     "or a sequence length it tiles")
    hints.append(f"more {stage}.micro_batches or a shorter {stage}.seq_len")
    return ", ".join(hints)


def preflight(config: Any) -> list[str]:
    """Problems that need both models' metadata (no weights are read)."""
    from motab_jax.text import check_shared_vocabulary

    stages = stages_of(config)
    facts = {role: model_facts(config[role], role) for role in ("teacher", "student")}
    problems: list[str] = []
    unknown = [role for role, f in facts.items() if f.config is None]
    if unknown:
        log.info("preflight: %s not readable before loading (hub unreachable or a .gguf file); the vocabulary "
                 "and memory checks run when the models stage loads them", " and ".join(unknown))
    teacher, student = facts["teacher"], facts["student"]
    if teacher.tokenizer is not None and student.tokenizer is not None and {"synthesize", "kd"} & set(stages):
        try:
            check_shared_vocabulary(teacher.tokenizer, student.tokenizer)
        except ValueError as e:
            problems.append(f"teacher.path / student.path: {e}")
    vocab = len(student.tokenizer) if student.tokenizer is not None else 0
    for field in ("token_top_k", "entropy_top_k"):
        if vocab and config.synthesis[field] > vocab:
            problems.append(f"synthesis.{field}={config.synthesis[field]}: must be <= the vocabulary ({vocab} ids)")
    if vocab and config.eval.get("top_k", 0) > vocab:
        problems.append(f"eval.top_k={config.eval.top_k}: must be <= the vocabulary ({vocab} ids)")
    if teacher.config is not None and student.config is not None:
        breakdown = memory_breakdown(config, teacher.config, student.config)
        have = float(config.synthesis.memory_budget_gb) * 2**30 or available_memory()
        summary = ", ".join(f"{k} {_size(sum(v.values()))}" for k, v in breakdown.items())
        log.info("preflight: memory estimate (parameters, caches, optimizer state, activations): %s; available %s "
                 "over %d device(s)", summary, _size(have), jax.device_count())
        for stage, parts in breakdown.items():
            total = sum(parts.values())
            if stage in stages and have and total > have:
                arithmetic = " + ".join(f"{name}: {_size(value)}" for name, value in parts.items())
                problems.append(
                    f"memory: stage {stage} needs at least {_size(total)} ({arithmetic} = {_size(total)}) but "
                    f"{_size(have)} are available over {jax.device_count()} device(s); use more devices, "
                    f"{_memory_hint(config, stage, parts)}")
    return problems
