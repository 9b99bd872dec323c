"""The embedded demo (the default of `python run.py`): runs offline on a laptop CPU in seconds.

Two small randomly initialised Qwen3-shaped models share the built-in byte-level tokenizer.
"""

from __future__ import annotations

import ml_collections

from configs import base


def _tiny(num_layers: int, hidden_size: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        model_type="qwen3", vocab_size=384, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=hidden_size // 4, qk_norm=True,
        bos_token_id=259, eos_token_ids=(260,), pad_token_id=259))


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.run_dir = "runs/demo"
    for name, (layers, width, seed) in {"teacher": (4, 128, 1), "student": (2, 64, 2)}.items():
        spec = config[name]
        spec.tokenizer = "byte_level"
        spec.dtype = "float32"
        spec.seed = seed
        spec.init = _tiny(layers, width)
    return config
