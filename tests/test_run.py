"""run.py's job on the embedded demo: validation, outputs, and skipping finished stages."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from configs import demo
from motab_jax.pipeline import run_pipeline, validate_config
from motab_jax.pipeline.runner import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_demo_models_stage_and_resume(tmp_path):
    config = demo.get_config()
    config.stages = "models"
    config.run_dir = str(tmp_path / "run")
    config.mesh.data, config.mesh.tensor = 2, 4  # a real 2 x 4 mesh over the 8 host devices
    summary = run_pipeline(config)["models"]
    assert [m["role"] for m in summary["models"]] == ["teacher", "student"]
    assert 0.0 <= summary["top1_agreement"] <= 1.0 and summary["reverse_kl"] > 0
    run = Path(config.run_dir)
    assert (run / "student_hf" / "model.safetensors").exists()
    assert json.loads((run / "config.json").read_text())["student"]["init"]["num_layers"] == 2
    # A rerun skips the finished stage and returns its recorded summary.
    (run / "student_hf" / "model.safetensors").unlink()
    assert run_pipeline(config)["models"]["top1_agreement"] == summary["top1_agreement"]
    assert not (run / "student_hf" / "model.safetensors").exists()


@pytest.mark.parametrize("field,value,pattern", [
    ("stages", "distill", "unknown stage 'distill'"),
    ("stages", "train", "unknown stage 'train'"),
    ("student.dtype", "fp8", r"student\.dtype='fp8'"),
    ("teacher.tokenizer", "gpt2", r"teacher\.tokenizer='gpt2'"),
    ("teacher.path", "./missing", r"teacher\.path='./missing'"),
    ("mesh.tensor", 3, "mesh: "),
])
def test_validation_names_field_and_accepted_values(field, value, pattern):
    config = demo.get_config()
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
    problems = validate_config(config)
    assert any(re.search(pattern, p) for p in problems), problems
    with pytest.raises(ConfigError, match="invalid configuration"):
        run_pipeline(config)


def test_run_py_command_line_reports_bad_override(tmp_path):
    result = subprocess.run([sys.executable, "run.py", "--config=configs/demo.py", "--config.student.dtype=fp8",
                             f"--config.run_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "student.dtype='fp8'" in result.stderr


def test_demo_pipeline_end_to_end_with_tiny_budgets(tmp_path):
    """pretrain -> synthesize (MOTAB and teacher-only) -> sft -> eval on the generated problems."""
    config = demo.get_config()
    config.run_dir = str(tmp_path / "run")
    config.data.demo_train, config.data.demo_held_out = 16, 4
    config.pretrain.teacher.epochs = config.pretrain.student.epochs = 1
    config.sft.epochs = 1
    config.synthesis.traj_cap, config.synthesis.num_slots = 24, 8
    config.eval.max_new_tokens = 16
    config.stages = "pretrain,synthesize,sft,kd,eval"
    config.kd.update(dict(prompts_per_step=4, samples_per_prompt=2, max_new_tokens=8, seq_len=160, epochs=1,
                          learning_rate=1e-4))
    summaries = run_pipeline(config)
    run = Path(config.run_dir)
    assert list(summaries) == ["pretrain", "synthesize", "sft", "kd", "eval"]
    assert summaries["kd"]["steps"] == 4 and (run / "kd" / "hf" / "model.safetensors").exists()
    for policy in ("motab", "teacher_only"):
        lines = (run / f"synthesis_{policy}.jsonl").read_text().splitlines()
        assert len(lines) == 16 and summaries["synthesize"][policy]["records"] == 16
        assert (run / f"sft_{policy}" / "hf" / "model.safetensors").exists()
    assert set(summaries["eval"]) - {"seconds"} == {"student (before)", "teacher", "student after motab SFT",
                                                      "student after teacher_only SFT", "student after on-policy KD"}
    assert "| teacher |" in (run / "results.md").read_text()


@pytest.mark.parametrize("name", ["base", "demo", "limo", "acereason", "qwen3_8b_to_1p7b"])
def test_shipped_configs_load_and_the_paper_ones_validate(name):
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()
    problems = validate_config(config)
    if name == "base":  # no models named: the error says which fields to set
        assert any("teacher.path is empty" in p for p in problems)
    else:
        assert problems == []


def test_hub_questions_fail_clearly_offline(tmp_path):
    from motab_jax.pipeline.stages import _read_questions

    with pytest.raises(Exception, match="HF_HUB_OFFLINE"):
        _read_questions("hf:GAIR/LIMO-v2@train", 0, "question,solution")
