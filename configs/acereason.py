"""The paper's second training set: the LIMO pair on AceReason-Math questions (problem/answer columns)."""

from __future__ import annotations

from configs import limo


def get_config():
    config = limo.get_config()
    config.run_dir = "runs/acereason"
    config.data.questions = "hf:nvidia/AceReason-Math@train"
    config.data.question_fields = "problem,answer"
    return config
