"""`load`: a Hugging Face folder, hub id or GGUF file -> (Decoder, tokenizer), placed on a mesh.

Every parameter is built with `jax.make_array_from_callback`: each device asks only for its own shard,
which is cut from memory-mapped safetensors one layer at a time, so the host never holds the model
twice and a process only reads what its devices own.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Mapping, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from tqdm.auto import tqdm

from motab_jax.errors import CheckpointError, MissingInputError, MotabInputError, Unreachable
from motab_jax.jsonl import read_json
from motab_jax.models.config import DTYPES, ModelConfig, config_from_hf
from motab_jax.models.hf_mapping import hf_keys, layer_shape
from motab_jax.models.mxfp4 import Mxfp4Tensors, is_mxfp4
from motab_jax.models.safetensors_io import SafetensorsFile
from motab_jax.models.sharding import DEFAULT_RULES, Rules, logical_sharding, logical_to_spec
from motab_jax.models.transformer import (
    Decoder,
    abstract_decoder,
    param_dtype,
    param_shape,
    param_specs,
    param_values,
    set_param_values,
)

log = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


class TensorSource(Protocol):
    """Named Hugging Face tensors, read lazily."""

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...


class SafetensorsFolder:
    """`model.safetensors`, or the shards listed by `model.safetensors.index.json`."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.exists():
            weight_map: dict[str, str] = read_json(index)["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (folder / f).exists()})
            if missing:
                raise MissingInputError(f"{index} lists shard files that are missing: {missing}; "
                                        "re-download the checkpoint")
            files = {f: SafetensorsFile(folder / f) for f in sorted(set(weight_map.values()))}
            self._where = {name: files[f] for name, f in weight_map.items()}
        elif single.exists():
            file = SafetensorsFile(single)
            self._where = {name: file for name in file.keys()}
        else:
            found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            raise MissingInputError(
                f"{folder}: no model.safetensors or model.safetensors.index.json (found {found}); "
                "PyTorch .bin checkpoints are not read: convert them with transformers' save_pretrained("
                "safe_serialization=True)")

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].shape(name))

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)


class InMemoryTensors:
    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._tensors = tensors

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> np.ndarray:
        return self._tensors[name]


def param_shardings(cfg: ModelConfig, mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> dict[str, jax.sharding.Sharding]:
    """Target sharding of every parameter: from the logical-axis rules (training's by default; generation stages
    pass `SAMPLING_RULES`), or one device without a mesh."""
    if mesh is None:
        return {name: SingleDeviceSharding(jax.devices()[0]) for name in param_specs(cfg)}
    return {name: logical_sharding(mesh, spec.axes, param_shape(cfg, spec), rules)
            for name, spec in param_specs(cfg).items()}


def placed_config(cfg: ModelConfig, mesh: Mesh | None, rules: Rules = DEFAULT_RULES) -> ModelConfig:
    """`cfg` with what the placement decides that the forward pass must know: the mesh axes the experts are
    split over (`expert_axes`, for the expert-parallel MoE layer)."""
    if not cfg.is_moe:
        return cfg
    axes: tuple[str, ...] = ()
    if mesh is not None:
        spec = param_specs(cfg)["layers.expert_down"]
        entry = logical_to_spec(spec.axes, param_shape(cfg, spec), mesh, rules)[1]
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return cfg.replace(expert_axes=axes)


def resharded(model: Decoder, rules: Rules, mesh: Mesh | None = None) -> Decoder:
    """`model` with its parameters placed by `rules` on `mesh` (default: the mesh they are on; the same model
    when they are on no mesh and none is given), as a copy: e.g. the training student placed for sampling."""
    values = param_values(model)
    sharding = next(iter(values.values())).sharding
    if mesh is None and not isinstance(sharding, jax.sharding.NamedSharding):
        return model
    mesh = mesh if mesh is not None else sharding.mesh
    shardings = param_shardings(model.config, mesh, rules)
    copy = abstract_decoder(placed_config(model.config, mesh, rules))
    set_param_values(copy, {name: jax.device_put(v, shardings[name]) for name, v in values.items()})
    return copy


def init_random(cfg: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> Decoder:
    """A randomly initialised Decoder, each parameter created directly in its target sharding."""
    cfg = placed_config(cfg, mesh, rules)
    make = jax.jit(lambda: param_values(Decoder(cfg, rngs=nnx.Rngs(seed))),
                   out_shardings=param_shardings(cfg, mesh, rules))
    model = abstract_decoder(cfg)
    set_param_values(model, make())
    return model


def load_params(cfg: ModelConfig, source: TensorSource, mesh: Mesh | None = None,
                where: str = "checkpoint", rules: Rules = DEFAULT_RULES) -> dict[str, jax.Array]:
    """Read every parameter of `cfg` from `source`, each placed with its target sharding."""
    specs = param_specs(cfg)
    available = source.names()
    keys = hf_keys(cfg)
    needed = [k.hf_name.format(i=i) for k in keys for i in (range(cfg.num_layers) if k.per_layer else [None])]
    missing = [n for n in needed if n not in available]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} tensors the {cfg.model_type} config needs are missing, e.g. "
                       f"{missing[:5]}; is the checkpoint complete and does config.json match it?")
    shardings = param_shardings(cfg, mesh, rules)
    params: dict[str, jax.Array] = {}
    # A bar per parameter group: a 32B checkpoint takes minutes to read. Hidden for small models.
    bar = tqdm(keys, desc=f"loading {Path(where).name or where}", unit="tensor",
               disable=cfg.num_params < 500_000_000 or None, leave=False)
    for key in bar:
        shape = param_shape(cfg, specs[key.param])
        sharding = shardings[key.param]
        dtype = np.dtype(param_dtype(cfg, specs[key.param]))

        # Expert weights are read only for the experts a device holds (MXFP4 dequantizes only those).
        by_expert = key.per_layer and specs[key.param].axes[1] == "experts" and not key.transposed_in_axes

        def read(index: tuple[slice, ...], key=key, shape=shape, dtype=dtype, by_expert=by_expert) -> np.ndarray:
            if not key.per_layer:
                return np.asarray(key.to_ours(source.get(key.hf_name), shape)[index], dtype=dtype)
            layers = range(cfg.num_layers)[index[0]]
            if by_expert:
                experts = len(range(shape[1])[index[1]])
                return np.stack([np.asarray(key.to_ours(_rows(source, key.hf_name.format(i=i), index[1]),
                                                        (experts, *shape[2:]))[(slice(None), *index[2:])],
                                            dtype=dtype) for i in layers])
            return np.stack([np.asarray(key.to_ours(source.get(key.hf_name.format(i=i)), shape[1:])[index[1:]],
                                        dtype=dtype) for i in layers])

        for i in (range(cfg.num_layers) if key.per_layer else [None]):
            name = key.hf_name.format(i=i)
            got = source.shape(name)
            want = layer_shape(cfg, key)
            if int(np.prod(got)) != int(np.prod(want)):
                raise CheckpointError(f"{where}: tensor {name} has shape {tuple(got)}, but config.json implies "
                                 f"{key.param} of shape {want}")
        params[key.param] = jax.make_array_from_callback(shape, sharding, read)
    return params


def _rows(source: TensorSource, name: str, rows: slice) -> np.ndarray:
    get_rows = getattr(source, "get_rows", None)
    return get_rows(name, rows) if get_rows is not None else source.get(name)[rows]


def is_hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder or file for `path_or_hub_id`, downloading from the hub only when reachable."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        return path
    name = str(path_or_hub_id)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise MissingInputError(f"{name}: no such file or folder, and not a hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download

    try:  # a snapshot already in the local hub cache needs no network
        return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here just means "not cached"
        pass
    if is_hub_offline():
        raise MissingInputError(f"{name}: not a local folder, not in the hub cache, and HF_HUB_OFFLINE=1; "
                                "download it where the hub is reachable (huggingface-cli download "
                                f"{name}) and pass the folder, or unset HF_HUB_OFFLINE")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    try:  # fail in seconds, not after the hub client's retry loop
        socket.create_connection((host.split(":")[0], 443), timeout=5).close()
    except OSError as e:
        raise Unreachable(f"{name}: the Hugging Face hub ({host}) is unreachable ({e}); pass a local "
                              "folder instead, or set HF_HUB_OFFLINE=1 to use only cached models") from e
    return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))


def load(path_or_hub_id: str | os.PathLike, *, dtype: str = "bfloat16", mesh: Mesh | None = None,
         compute_dtype: str | None = None, rules: Rules = DEFAULT_RULES,
         **config_overrides: Any) -> tuple[Decoder, Any]:
    """Load a Qwen2/Qwen2.5/Qwen3/Llama checkpoint as (model, tokenizer).

    `path_or_hub_id`: a Hugging Face folder (config.json, model.safetensors or a sharded index, tokenizer
    files), a hub id ("Qwen/Qwen3-4B"), or a `.gguf` file. Parameters are stored in `dtype` and computed
    in `compute_dtype` (default: `dtype`); logits are float32 over the tokenizer's vocabulary.
    `rules`: the logical-axis rules that place the parameters on `mesh` (`sharding.SAMPLING_RULES` for models
    that only decode). `config_overrides` set `ModelConfig` fields (e.g. remat="full", attention_impl="xla").
    The tokenizer is None (with a warning) when the folder has no tokenizer files.
    """
    from motab_jax.text import load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; accepted: {sorted(DTYPES)}")
    path = resolve_checkpoint(path_or_hub_id)
    fields = dict(param_dtype=dtype, compute_dtype=compute_dtype or dtype, **config_overrides)
    if path.is_file() and path.suffix == ".gguf":
        from motab_jax.models.gguf import read_gguf

        checkpoint = read_gguf(path)
        hf_config, source, tokenizer = checkpoint.hf_config, InMemoryTensors(checkpoint.tensors), checkpoint.tokenizer
    elif path.is_dir():
        config_file = path / "config.json"
        if not config_file.exists():
            raise MissingInputError(f"{path}: no config.json; is this a Hugging Face model folder?")
        hf_config = read_json(config_file)
        source = SafetensorsFolder(path)
        if is_mxfp4(hf_config):  # gpt-oss as released: experts in MXFP4, dequantized expert by expert
            source = Mxfp4Tensors(source)
        try:
            tokenizer = load_tokenizer(path)
        except FileNotFoundError as e:
            log.warning("%s; the model is returned without a tokenizer", e)
            tokenizer = None
    else:
        raise ValueError(f"{path}: expected a model folder or a .gguf file")
    if path.is_dir():
        hf_config = _with_generation_eos(hf_config, path)
    cfg = config_from_hf(hf_config, source=str(path / "config.json") if path.is_dir() else str(path), **fields)
    if tokenizer is not None and "logits_vocab_size" not in config_overrides:
        cfg = cfg.replace(logits_vocab_size=vocab_for_logits(cfg, len(tokenizer), str(path)))
    cfg = placed_config(cfg, mesh, rules)
    model = abstract_decoder(cfg)
    set_param_values(model, load_params(cfg, source, mesh, where=str(path), rules=rules))
    return model, tokenizer


def _with_generation_eos(hf_config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`hf_config` with the eos ids of `generation_config.json` added: what `generate` stops on (gpt-oss lists
    <|return|>, <|endoftext|> and <|call|> there, its config.json only <|return|>)."""
    file = folder / "generation_config.json"
    if not file.exists():
        return hf_config
    try:
        extra = read_json(file).get("eos_token_id")
    except (MotabInputError, AttributeError):
        log.warning("%s is not a JSON object; its eos ids are ignored", file)
        return hf_config
    own = _token_ids(hf_config.get("eos_token_id"))
    merged = own + [i for i in _token_ids(extra) if i not in own]
    return {**hf_config, "eos_token_id": merged} if merged else hf_config


def _token_ids(value: Any) -> list[int]:
    return [int(v) for v in (value if isinstance(value, list) else [value] if value is not None else [])]


def vocab_for_logits(cfg: ModelConfig, tokenizer_size: int, where: str) -> int:
    """Embedding rows past the tokenizer are padding (Qwen2.5-0.5B: 151936 rows, 7B: 152064): drop them."""
    if tokenizer_size > cfg.vocab_size:
        log.warning("%s: tokenizer has %d tokens but the embedding only %d rows; ids >= %d have no logits",
                    where, tokenizer_size, cfg.vocab_size, cfg.vocab_size)
        return 0
    return tokenizer_size if tokenizer_size < cfg.vocab_size else 0
