"""One prompt convention per model: the preflight renders the job's first questions with the student's and the
teacher's tokenizers and reports the first difference; synthesis records keep the prompt each model saw."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from configs import demo
from motab_jax.motab.records import build_record
from motab_jax.motab.state import SRC_STUDENT
from motab_jax.pipeline import preflight
from motab_jax.pipeline.prompt_check import (check_prompt_convention, compare_rendered_prompts, first_difference,
                                             preview_questions)
from motab_jax.text import byte_level_tokenizer, load_tokenizer
from motab_jax.text.prompts import question_prompt

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "qwen3_untied"
# Qwen2.5-Instruct's convention: a default system message when the conversation has none.
SYSTEM_DEFAULT = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant."
                  "<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{{- '<|im_start|>' + message['role'] + "
                  "'\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
                  "{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _golden(template: str | None = None):
    """The tiny golden Qwen3 model's tokenizer (320 ids, Qwen's chat format), optionally with another template."""
    tokenizer = load_tokenizer(GOLDEN)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def _byte_level(template: str):
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def test_first_difference() -> None:
    assert first_difference("abc", "abc") is None
    assert first_difference("abc", "abd") == 2
    assert first_difference("ab", "abc") == 2 and first_difference("abc", "ab") == 2
    assert first_difference("", "x") == 0


def test_compare_rendered_prompts() -> None:
    questions = ["What is 2 + 3?", "Find x if 4x = 12."]
    assert compare_rendered_prompts(_golden(), _golden(), questions, instruction="Reason.") is None
    student = _golden(SYSTEM_DEFAULT)
    difference = compare_rendered_prompts(student, _golden(), questions, instruction="Reason.")
    assert difference is not None and (difference.question, difference.position) == (0, len("<|im_start|>"))
    assert difference.student.startswith("<|im_start|>system") and difference.teacher.startswith("<|im_start|>user")
    assert "character 12" in difference.describe()
    # "raw" prompts do not go through the chat template: both tokenizers render the bare content.
    assert compare_rendered_prompts(student, _golden(), questions, prompt_format="raw") is None
    # Across vocabularies the teacher may have its own format (synthesis.teacher_prompt_format).
    difference = compare_rendered_prompts(byte_level_tokenizer(), _golden(), questions[1:],
                                          prompt_format="raw", teacher_prompt_format="chat")
    assert (difference.question, difference.position) == (0, 0)


def test_check_prompt_convention_warns_for_one_vocabulary(caplog: pytest.LogCaptureFixture) -> None:
    config = demo.get_config()
    source, questions = preview_questions(config)
    assert source == "the demo's first problems" and len(questions) == 3
    student, teacher = _golden(SYSTEM_DEFAULT), _golden()
    with caplog.at_level(logging.INFO, logger="motab_jax"):
        difference = check_prompt_convention(config, teacher, student)
    assert difference is not None and difference.position == len("<|im_start|>")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "trained on the teacher's template but evaluated on its own" in warnings[0]
    assert "first difference at character 12" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="motab_jax"):  # across vocabularies: expected, an info line
        difference = check_prompt_convention(config, teacher, _byte_level(SYSTEM_DEFAULT))
    assert difference is not None and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("across vocabularies" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="motab_jax"):
        assert check_prompt_convention(config, teacher, _golden()) is None
    assert any("render the demo's first problems identically" in r.getMessage() for r in caplog.records)


def test_preview_questions_reads_the_job_questions(tmp_path: Path) -> None:
    config = demo.get_config()
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "a", "problem": "First?"}\n\n{"id": "b", "question": "Second?"}\n'
                    '{"id": "c", "prompt": "Third?"}\n{"id": "d", "problem": "Fourth?"}\n')
    config.data.questions = str(path)
    assert preview_questions(config) == (f"the first questions of {path}", ["First?", "Second?", "Third?"])
    config.data.questions = "hf:GAIR/LIMO-v2@train"  # nothing is downloaded at preflight
    assert preview_questions(config)[1] == [config.models.probe_prompt]


def test_preflight_warns_when_one_vocabulary_pair_renders_differently(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    folders = {}
    for role in ("teacher", "student"):
        folders[role] = tmp_path / role
        folders[role].mkdir()
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "chat_template.jinja"):
            shutil.copy(GOLDEN / name, folders[role] / name)
    config = demo.get_config()
    config.stages = "synthesize,sft,eval"
    config.teacher.path, config.student.path = str(folders["teacher"]), str(folders["student"])
    with caplog.at_level(logging.INFO, logger="motab_jax"):
        assert preflight(config) == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    (folders["student"] / "chat_template.jinja").write_text(SYSTEM_DEFAULT)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="motab_jax"):
        assert preflight(config) == []  # a warning, not a problem: the job may still run
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "evaluated on its own" in warnings[0], warnings


def test_synthesis_records_keep_the_prompt_each_model_saw() -> None:
    # One vocabulary: both models read the teacher tokenizer's rendering; the record says so in both fields.
    tokenizer = _golden()
    prompt, _ = question_prompt(tokenizer, "What is 2 + 3?", "Reason.")
    tokens = np.asarray(tokenizer("2 + 3 = 5.", add_special_tokens=False)["input_ids"] + [0] * 4)
    n = len(tokens) - 4
    slot = {"out_len": n, "out_tokens": tokens, "out_src": np.full(len(tokens), SRC_STUDENT), "breach_step": 0,
            "explore_len": 0, "num_steps": 0, "step_start": np.zeros(1), "step_value": np.zeros(1),
            "step_eps": np.zeros(1), "step_h": np.zeros(1), "root_step": 0, "safe_len": 0, "interventions": 0,
            "finish": 0, "drafted": 0, "accepted_drafts": 0, "teacher_forwards": 0}
    record = build_record(tokenizer, slot, question_id="q", sample_index=0, prompt=prompt, policy_name="student_only",
                          stitched=False, revise="REVISE")
    assert record["prompt"] == record["teacher_prompt"] == prompt and record["response"] == "2 + 3 = 5."
