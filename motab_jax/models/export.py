"""`export_hf`: write a Decoder as a Hugging Face checkpoint folder that transformers and vLLM/SGLang read.

Tensors are fetched from the devices one layer at a time and written shard by shard, so exporting a
large model needs about one shard of host memory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from motab_jax.models.config import config_to_hf
from motab_jax.models.hf_mapping import hf_keys, layer_shape
from motab_jax.models.safetensors_io import save_safetensors
from motab_jax.models.transformer import Decoder, param_values

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def export_hf(model: Decoder, tokenizer: Any, out_dir: str | os.PathLike, *, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write `config.json`, safetensors (sharded above `max_shard_bytes`), `generation_config.json` and
    the tokenizer files (when `tokenizer` is given) to `out_dir`. `dtype` defaults to the parameter dtype.

    In a multi-process run every process must call this (the parameters are gathered collectively);
    only process 0 writes.
    """
    cfg = model.config
    out = Path(out_dir)
    write = jax.process_index() == 0
    if write:
        out.mkdir(parents=True, exist_ok=True)
    target = np.dtype(jax.numpy.dtype(dtype or cfg.param_dtype))
    params = param_values(model)

    # Plan the shards from shapes alone, then fill them one at a time.
    entries: list[tuple[str, Any, int | None]] = []  # (hf name, key, layer)
    sizes: list[int] = []
    for key in hf_keys(cfg):
        per_tensor = int(np.prod(layer_shape(cfg, key))) * target.itemsize
        for layer in (range(cfg.num_layers) if key.per_layer else [None]):
            entries.append((key.hf_name.format(i=layer), key, layer))
            sizes.append(per_tensor)
    shards: list[list[int]] = [[]]
    running = 0
    for i, size in enumerate(sizes):
        if shards[-1] and running + size > max_shard_bytes:
            shards.append([])
            running = 0
        shards[-1].append(i)
        running += size
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    weight_map: dict[str, str] = {}
    for shard, file_name in zip(shards, names):
        tensors = []
        for i in shard:
            hf_name, key, layer = entries[i]
            value = params[key.param] if layer is None else params[key.param][layer]
            tensors.append((hf_name, np.ascontiguousarray(key.to_hf(_to_host(value)).astype(target))))
            weight_map[hf_name] = file_name
        if write:
            save_safetensors(out / file_name, tensors)
    if not write:
        return out
    if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf_config = config_to_hf(cfg)
    hf_config["dtype"] = str(target)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    generation = {k: v for k, v in (("bos_token_id", hf_config.get("bos_token_id")),
                                    ("eos_token_id", hf_config.get("eos_token_id")),
                                    ("pad_token_id", hf_config.get("pad_token_id"))) if v is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    log.info("exported %s (%d tensors, %d file(s)) to %s", cfg.model_type, len(entries), len(shards), out)
    return out
