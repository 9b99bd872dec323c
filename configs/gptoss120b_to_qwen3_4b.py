"""The paper's best pair: the gpt-oss-120b teacher judges Qwen3-4B-Instruct-2507's text (spec section 7:
AIME24 P@1 47.08, AIME25 P@1 47.50).

The LIMO recipe of `configs/limo.py` with a mixture-of-experts teacher whose tokenizer (o200k_harmony) differs
from the student's: synthesis scores the student's text with the teacher's tokenizer (README, "Teachers with
another tokenizer"), so on-policy KD and skd_token are not offered. The teacher's prompt is rendered in the
harmony format by its own chat template, with `teacher.reasoning_effort` ("medium": gpt-oss's default, which the
released MOTAB code keeps by sending no level); the teacher's replies are cut to their final
channel where text is graded. The released checkpoint's MXFP4 experts are dequantized to bf16 while they are
placed: 233.7 GB of weights, so a TPU v5p-8 (4 x 95 GB) or 8 x H100 (README, "Model families").
Experts are split over the devices of each engine group (`SAMPLING_RULES`: 128 experts over fsdp x tensor).
"""

from __future__ import annotations

from configs import limo


def get_config():
    config = limo.get_config()
    config.run_dir = "runs/gptoss120b_to_qwen3_4b"
    config.teacher.path = "openai/gpt-oss-120b"
    config.stages = "synthesize,sft,eval"
    return config
