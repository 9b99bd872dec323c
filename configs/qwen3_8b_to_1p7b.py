"""The on-policy comparison: Qwen3-8B teacher -> Qwen3-1.7B student, MOTAB SFT followed by on-policy KD
(reverse KL, lr 2e-6, 10 epochs, 5 rollouts per prompt at temperature 0.6 / top-p 0.95; spec section 6)."""

from __future__ import annotations

from configs import limo


def get_config():
    config = limo.get_config()
    config.run_dir = "runs/qwen3_8b_to_1p7b"
    config.teacher.path = "Qwen/Qwen3-8B"
    config.student.path = "Qwen/Qwen3-1.7B"
    config.stages = "synthesize,sft,kd,eval"
    config.policies = ""  # one run of synthesis.policy (motab); baselines: --config.synthesis.policy=skd_step
    config.kd.from_policy = "motab"
    return config
