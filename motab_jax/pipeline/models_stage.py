"""Stage "models": load teacher and student, compare them (token by token when they share a vocabulary, and how
their tokenizers render the job's first prompts), export the student."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from motab_jax.models.export import export_hf
from motab_jax.models.factory import build_model
from motab_jax.models.loading import load
from motab_jax.pipeline.prompt_check import check_prompt_convention
from motab_jax.text import VocabularyMismatchError, check_shared_vocabulary

log = logging.getLogger("motab_jax")


def _describe(name: str, model: Any, source: str) -> dict[str, Any]:
    cfg = model.config
    return {"role": name, "source": source or "random init", "model_type": cfg.model_type,
            "layers": cfg.num_layers, "hidden": cfg.hidden_size, "heads": f"{cfg.num_heads}/{cfg.num_kv_heads}",
            "params_M": round(cfg.num_params / 1e6, 3), "vocab": cfg.output_vocab_size, "dtype": cfg.param_dtype}


def run_models_stage(config: Any, run_dir: Path, mesh: Mesh) -> dict[str, Any]:
    teacher, teacher_tok = build_model(config.teacher, mesh)
    student, student_tok = build_model(config.student, mesh)
    try:
        check_shared_vocabulary(teacher_tok, student_tok)
        shared = True
    except VocabularyMismatchError as e:
        shared = False
        log.info("models: %s; the token-level comparison (top-1 agreement, KL) needs one vocabulary and is skipped",
                 str(e).split(".")[0])
    rows = [_describe("teacher", teacher, config.teacher.path), _describe("student", student, config.student.path)]
    for row in rows:
        log.info("%(role)-8s %(model_type)s  %(layers)d layers  d=%(hidden)d  heads %(heads)s  "
                 "%(params_M).3fM params  vocab %(vocab)d  %(dtype)s  [%(source)s]", row)

    # Also here, not only at preflight: a .gguf model's tokenizer is read only with its weights.
    difference = check_prompt_convention(config, teacher_tok, student_tok)
    messages = [{"role": "user", "content": config.models.probe_prompt}]
    ids = student_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    tokens = jnp.asarray([ids], jnp.int32)
    student_logits = jax.jit(lambda m, x: m(x))(student, tokens)
    agreement = reverse_kl = None
    if shared:
        teacher_logits = jax.jit(lambda m, x: m(x))(teacher, tokens)
        log_p_s = jax.nn.log_softmax(student_logits, -1)
        log_p_t = jax.nn.log_softmax(teacher_logits, -1)
        reverse_kl = float(jnp.mean(jnp.sum(jnp.exp(log_p_s) * (log_p_s - log_p_t), -1)))
        agreement = float(jnp.mean(jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)))
        log.info("probe prompt (%d tokens): top-1 agreement %.3f, mean KL(student || teacher) %.4f nats",
                 len(ids), agreement, reverse_kl)

    export_dir = export_hf(student, student_tok, run_dir / "student_hf")
    reloaded, _ = load(export_dir, dtype=student.config.param_dtype, mesh=mesh,
                       compute_dtype=student.config.compute_dtype)
    round_trip = float(np.abs(np.asarray(reloaded(tokens)) - np.asarray(student_logits)).max())
    if round_trip != 0.0:
        raise RuntimeError(f"exported student in {export_dir} reloads with logits differing by {round_trip}")
    log.info("student exported to %s (Hugging Face format); reload reproduces its logits exactly", export_dir)
    return {"models": rows, "probe_tokens": len(ids), "top1_agreement": agreement,
            "reverse_kl": reverse_kl, "student_export": str(export_dir),
            "prompt_difference": dataclasses.asdict(difference) if difference else None}
