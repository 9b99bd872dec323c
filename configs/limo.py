"""The paper's main setting: Qwen3-32B teacher -> Qwen3-4B-Instruct-2507 student on LIMO-v2 questions.

Synthesis, SFT and evaluation use the paper's hyperparameters (the defaults of configs/base.py): R = 5
trajectories per question, eps0 = 0.2, theta = 1.0, entropy top-20, delimiter ".\\n\\n", temperature 0.6,
SFT lr 5e-5 cosine to 1e-6, 5% warmup, 6 epochs, global batch 32, cutoff 32768. Meshes: parameters sharded
ZeRO-3 style over all devices (`fsdp=-1`), which fits a TPU v5p-8 / v4-8 and 8 GPUs; on a pod add data
parallelism (`--config.mesh.data=N --config.mesh.fsdp=8`), and for the 32B teacher's synthesis on GPUs
tensor parallelism (`--config.mesh.fsdp=1 --config.mesh.tensor=8`).
"""

from __future__ import annotations

from configs import base


def get_config():
    config = base.get_config()
    config.run_dir = "runs/limo"
    config.teacher.path = "Qwen/Qwen3-32B"
    config.student.path = "Qwen/Qwen3-4B-Instruct-2507"
    config.data.questions = "hf:GAIR/LIMO-v2@train"
    config.data.question_fields = "question,solution"
    config.policies = ""  # one run of synthesis.policy (motab); baselines: --config.synthesis.policy=skd_step
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    config.synthesis.num_slots = 64
    config.sft.micro_batches = 4
    # Full remat for the student: at 32K tokens and 8 rows per micro-batch, "dots" keeps every layer's
    # projections (~605 GiB of activations by the preflight's estimate on GPU/TPU, more than 8 x 80 GB);
    # "full" keeps only each layer's input (~110 GiB; 176 GiB with parameters and AdamW state).
    config.teacher.remat = "dots"
    config.student.remat = "full"
    return config
