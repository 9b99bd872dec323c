"""Bad inputs to loading fail fast with messages that name the input and what to do."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

import motab_jax
from fixtures.make_golden import GOLDEN_DIR
from motab_jax.errors import CheckpointError
from motab_jax.models.config import UnsupportedModelError, config_from_hf
from motab_jax.models.safetensors_io import SafetensorsFile, save_safetensors


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(GOLDEN_DIR / "llama3_untied", folder)
    return folder


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_unsupported_model_type_lists_supported(checkpoint):
    _edit_config(checkpoint, model_type="mistral")
    with pytest.raises(UnsupportedModelError, match=r"'mistral'.*\['gpt_oss', 'llama', 'qwen2', 'qwen3'\]"):
        motab_jax.load(checkpoint)


@pytest.mark.parametrize("changes,pattern", [
    ({"rope_parameters": {"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e6}}, "rope_type 'longrope'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
])
def test_unsupported_options(changes, pattern):
    hf = json.loads((GOLDEN_DIR / "qwen3_untied" / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match=pattern):
        config_from_hf({**hf, **changes})


def test_missing_config_and_weights(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        motab_jax.load(tmp_path)
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        motab_jax.load(checkpoint)


def test_missing_tensor_is_named(checkpoint):
    file = SafetensorsFile(checkpoint / "model.safetensors")
    kept = {name: np.array(file.get(name)) for name in file.keys() if name != "model.layers.1.mlp.up_proj.weight"}
    del file
    save_safetensors(checkpoint / "model.safetensors", kept)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        motab_jax.load(checkpoint)


def test_config_that_does_not_match_the_weights(checkpoint):
    _edit_config(checkpoint, intermediate_size=96)
    with pytest.raises(ValueError, match=r"gate_proj\.weight has shape \(128, 64\)"):
        motab_jax.load(checkpoint)


def test_sharded_index_with_missing_shard(checkpoint):
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        motab_jax.load(checkpoint)


def test_corrupt_safetensors(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        motab_jax.load(checkpoint)


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype='fp8'"):
        motab_jax.load(GOLDEN_DIR / "llama_tied", dtype="fp8")


def test_hub_id_offline_fails_immediately(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
        motab_jax.load("Qwen/Qwen3-0.6B")
    assert time.monotonic() - start < 5


def test_not_a_path_nor_a_hub_id():
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        motab_jax.load("./no/such/folder")
