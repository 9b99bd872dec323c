"""A paper pair across vocabularies: the Qwen3-32B teacher judges Llama-3.2-3B-Instruct's text (spec section 7).

The LIMO recipe of `configs/limo.py` with a student whose tokenizer differs from the teacher's: synthesis runs
with text-level scoring (the teacher re-encodes the student's steps with its own tokenizer; README, "Teachers
with another tokenizer"), so on-policy KD and skd_token, which compare the models id by id, are not offered.
Each model renders its prompt with its own chat template.
"""

from __future__ import annotations

from configs import limo


def get_config():
    config = limo.get_config()
    config.run_dir = "runs/qwen3_32b_to_llama3p2_3b"
    config.student.path = "meta-llama/Llama-3.2-3B-Instruct"
    config.stages = "synthesize,sft,eval"
    return config
