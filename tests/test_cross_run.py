"""run.py's job across vocabularies, killed mid-synthesis and rerun: the tiny demo pair with a Qwen-vocabulary
teacher (151,669 ids) judging the byte-level student's text (`motab.cross_engine`), stages synthesize, sft, eval.
The fast end-to-end run of the same pair is tests/test_run.py::test_a_teacher_with_another_tokenizer_runs_synthesis_sft_and_eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from motab_jax.pipeline import run_pipeline
from test_run import ROOT, TINY, _kill_when, _outputs

# The cross pair on the demo with tiny budgets (test_run.TINY), synthesis, SFT and evaluation only: a config file
# run.py reads as well as this process.
CONFIG = """
from configs import demo


def get_config():
    config = demo.get_config()
    for key, value in {tiny!r}.items():
        section, _, field = key.rpartition(".")
        target = config
        for part in filter(None, section.split(".")):
            target = target[part]
        target[field] = value
    config.stages, config.policies = "synthesize,sft,eval", "motab"
    config.teacher.tokenizer = "qwen3"
    config.teacher.init.update(dict(vocab_size=151669, eos_token_ids=(151645,), bos_token_id=None,
                                    pad_token_id=151643))
    config.data.demo_train, config.data.demo_held_out = 12, 2
    config.sft.global_batch_size = 2
    config.synthesis.eps0 = 0.5  # random models: the teacher intervenes
    config.synthesis.num_slots = 2  # records come in 6 waves, so a kill lands between two of them
    config.run_dir = {run_dir!r}
    config.compilation_cache_dir = {cache!r}  # shared by the jobs: compiled once
    return config
"""


def _config_file(folder: Path, run_dir: Path, cache: Path) -> Path:
    path = folder / f"cross_{run_dir.name}.py"
    path.write_text(CONFIG.format(tiny=TINY, run_dir=str(run_dir), cache=str(cache)))
    return path


def _load(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.slow  # three jobs of ~1-3 minutes each on 2 cores
def test_a_killed_cross_vocabulary_run_resumes_to_the_same_outputs(tmp_path):
    """run.py SIGKILLed once some records exist, then rerun: records, the exported student's bytes and the results
    equal an uninterrupted job's (resume is per record: finished trajectories are kept, the rest run again with the
    same keys)."""
    cache = tmp_path / "jax_cache"
    reference = _load(_config_file(tmp_path, tmp_path / "uninterrupted", cache))
    run_pipeline(reference)
    records = [json.loads(line) for line in (Path(reference.run_dir) / "synthesis_motab.jsonl").read_text().splitlines()]
    assert len(records) == 12 and any(r["breach_step"] for r in records)  # the teacher intervened
    assert all("teacher_token_ids" in s for r in records for s in r["segments"] if s["source"] == "teacher")

    run = tmp_path / "run"
    command = [sys.executable, "run.py", f"--config={_config_file(tmp_path, run, cache)}"]
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")

    def lines(path: Path) -> int:
        return len(path.read_text().splitlines()) if path.exists() else 0

    assert _kill_when(command, run, lambda r: lines(r / "synthesis_motab.jsonl") >= 2, env)
    assert not (run / "stages" / "synthesize.done").exists() and 2 <= lines(run / "synthesis_motab.jsonl") < 12
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "## Accuracy" in result.stdout
    resumed, uninterrupted = _outputs(run), _outputs(Path(reference.run_dir))
    assert sorted(resumed) == sorted(uninterrupted)
    assert any(key.endswith("model.safetensors") for key in uninterrupted)
    for key in uninterrupted:
        assert resumed[key] == uninterrupted[key], key
