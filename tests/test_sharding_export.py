"""Mesh rules, sharded loading/forward on 8 host devices, and the Hugging Face export round trip."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import motab_jax
from fixtures.make_golden import GOLDEN_DIR, TOKENIZER_SIZE
from motab_jax.models.sharding import MeshConfig, logical_to_spec, make_mesh
from motab_jax.models.transformer import param_values

TOL = 1e-4


def test_conftest_gives_eight_devices():
    assert jax.device_count() == 8


def test_mesh_config_resolves_and_rejects():
    assert MeshConfig().shape(8) == (8, 1, 1)
    assert MeshConfig(data=-1, tensor=4).shape(8) == (2, 1, 4)
    assert MeshConfig(data=1, fsdp=2, tensor=4).shape(8) == (1, 2, 4)
    with pytest.raises(ValueError, match="8 are available"):
        MeshConfig(data=2, fsdp=2, tensor=4).shape(8)
    with pytest.raises(ValueError, match="at most one"):
        MeshConfig(data=-1, fsdp=-1).shape(8)
    with pytest.raises(ValueError, match="cannot be split"):
        MeshConfig(data=-1, tensor=3).shape(8)


def test_rules_replicate_dimensions_the_mesh_does_not_divide():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    assert logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16), mesh) == \
        P(None, "fsdp", "tensor", None)
    # 2 KV heads cannot be split 4 ways: replicated rather than failing.
    assert logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16), mesh) == \
        P(None, "fsdp", None, None)
    assert logical_to_spec(("batch", "length"), (4, 9), mesh) == P("fsdp", None)
    data_fsdp = make_mesh(MeshConfig(data=2, fsdp=4))
    assert logical_to_spec(("batch", "length"), (8, 9), data_fsdp) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch", "length"), (4, 9), data_fsdp) == P("data", None)  # 4 not split 8 ways


@pytest.mark.parametrize("mesh_config", [MeshConfig(data=2, tensor=4), MeshConfig(data=1, fsdp=2, tensor=4),
                                         MeshConfig(data=1, fsdp=8)])
def test_sharded_forward_equals_unsharded(mesh_config):
    folder = GOLDEN_DIR / "qwen3_untied"
    expected = np.load(folder / "expected_logits.npz")
    mesh = make_mesh(mesh_config)
    model, _ = motab_jax.load(folder, dtype="float32", mesh=mesh)
    wq = model.layers.wq[...]
    assert wq.sharding.mesh.shape == mesh.shape
    if mesh.shape["tensor"] > 1:
        assert wq.sharding.spec[2] == "tensor"  # heads split over the tensor axis
        assert wq.addressable_shards[0].data.shape[2] == 4 // mesh.shape["tensor"]
    host_ids = np.tile(expected["input_ids"], (4, 1))  # batch 8
    ids = jax.device_put(host_ids, jax.sharding.NamedSharding(
        mesh, logical_to_spec(("batch", "length"), host_ids.shape, mesh)))
    logits = jax.jit(lambda m, x: m(x))(model, ids)
    unsharded, _ = motab_jax.load(folder, dtype="float32")
    np.testing.assert_allclose(np.asarray(logits), np.asarray(unsharded(jnp.asarray(host_ids))), atol=TOL)
    np.testing.assert_allclose(np.asarray(logits)[:2], expected["logits"][..., :TOKENIZER_SIZE], atol=TOL)


@pytest.mark.parametrize("name", ["llama3_untied", "qwen2_tied"])
def test_export_round_trip(name, tmp_path):
    folder = GOLDEN_DIR / name
    expected = np.load(folder / "expected_logits.npz")
    model, tokenizer = motab_jax.load(folder, dtype="float32")
    # A tiny shard limit forces the sharded format with an index file.
    out = motab_jax.export_hf(model, tokenizer, tmp_path / "export", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").exists()
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    assert ("lm_head.weight" in weight_map) == (name == "llama3_untied")
    for file in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / file).exists(), file
    # Every tensor equals the original checkpoint's, bit for bit.
    from safetensors.numpy import load_file

    original = load_file(folder / "model.safetensors")
    exported = {}
    for shard in set(weight_map.values()):
        exported.update(load_file(out / shard))
    assert set(exported) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    reloaded, reloaded_tokenizer = motab_jax.load(out, dtype="float32")
    assert reloaded.config == model.config
    assert reloaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    ids = jnp.asarray(expected["input_ids"])
    np.testing.assert_array_equal(np.asarray(reloaded(ids)), np.asarray(model(ids)))


@pytest.mark.parametrize("name", ["llama3_untied", "qwen3_untied", "qwen2_tied"])
def test_export_loads_in_transformers(name, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    folder = GOLDEN_DIR / name
    expected = np.load(folder / "expected_logits.npz")
    model, tokenizer = motab_jax.load(folder, dtype="float32", logits_vocab_size=0)
    out = motab_jax.export_hf(model, tokenizer, tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(torch.as_tensor(expected["input_ids"], dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(hf_logits, np.asarray(model(jnp.asarray(expected["input_ids"]))), atol=TOL)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer("the theme").input_ids == tokenizer("the theme").input_ids


def test_export_bfloat16_from_sharded_model(tmp_path):
    folder = GOLDEN_DIR / "llama_tied"
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model, tokenizer = motab_jax.load(folder, dtype="float32", mesh=mesh)
    out = motab_jax.export_hf(model, tokenizer, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded, _ = motab_jax.load(out, dtype="float32")
    for key, value in param_values(model).items():
        want = np.asarray(jnp.asarray(value).astype(jnp.bfloat16).astype(jnp.float32))
        np.testing.assert_array_equal(np.asarray(param_values(reloaded)[key]), want, err_msg=key)
