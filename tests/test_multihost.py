"""Two processes on localhost (4 CPU devices each, gloo collectives) load, run and export one model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures.make_golden import GOLDEN_DIR, TOKENIZER_SIZE
from motab_jax.models.safetensors_io import SafetensorsFile

WORKER = Path(__file__).with_name("multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two_processes(tmp_path, result: str, *mode: str) -> None:
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": str(WORKER.parents[1])}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), port, str(tmp_path / "export"),
                               str(tmp_path / f"{result}{i}.npy"), *mode], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out[-3000:]


def test_two_process_mesh_load_forward_export(tmp_path):
    _run_two_processes(tmp_path, "logits")
    expected = np.load(GOLDEN_DIR / "qwen3_untied" / "expected_logits.npz")["logits"][..., :TOKENIZER_SIZE]
    for i in range(2):
        logits = np.load(tmp_path / f"logits{i}.npy")
        assert logits.shape == (4, *expected.shape[1:])
        np.testing.assert_allclose(logits[:2], expected, atol=1e-4)
        np.testing.assert_allclose(logits[2:], expected, atol=1e-4)
    original = SafetensorsFile(GOLDEN_DIR / "qwen3_untied" / "model.safetensors")
    exported = SafetensorsFile(tmp_path / "export" / "model.safetensors")
    assert sorted(exported.keys()) == sorted(original.keys())
    for name in original.keys():
        np.testing.assert_array_equal(exported.get(name), original.get(name), err_msg=name)


@pytest.mark.slow  # ~55 s; the fast set keeps the two-process load / forward / export test
def test_two_process_training_equals_one_process(tmp_path):
    from multihost_worker import train_losses

    from motab_jax.models.sharding import MeshConfig, make_mesh

    _run_two_processes(tmp_path, "losses", "train")
    single = train_losses(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    for i in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"losses{i}.npy"), single, rtol=1e-5)
