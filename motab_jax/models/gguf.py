"""Read a llama.cpp GGUF file of a Llama-architecture model as a Hugging Face checkpoint.

`read_gguf` dequantizes every tensor to float32 (with the `gguf` package), renames it to the name and
[out, in] layout a Hugging Face `LlamaForCausalLM` checkpoint uses, and rebuilds the config and the
tokenizer from the file's metadata. `convert_gguf_to_hf` writes the result as a checkpoint folder
(`config.json`, `model.safetensors`, tokenizer files, `generation_config.json`) that both
`transformers` and this package's Hugging Face loaders can read.

Supported: `general.architecture == "llama"`, `tokenizer.ggml.model == "gpt2"` (byte-level BPE),
and the tensor types listed in `SUPPORTED_TENSOR_TYPES`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import struct
from typing import Any

import numpy as np

from motab_jax.errors import CheckpointError, MissingInputError
from motab_jax.models.config import UnsupportedModelError

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama",)
SUPPORTED_TOKENIZER_MODELS: tuple[str, ...] = ("gpt2",)
# Types `gguf.quants.dequantize` implements and that llama.cpp uses for Llama weights.
SUPPORTED_TENSOR_TYPES: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

# GGUF tensor name -> Hugging Face tensor name. "{i}" is the layer index.
_TENSOR_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)")

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), applied one after another before the
# byte-level mapping, keyed by `tokenizer.ggml.pre`.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo"), (_GPT2_SPLIT,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), (r"\p{N}", _GPT2_SPLIT)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "dbrx", "smaug-bpe", "falcon3"), (_LLAMA3_SPLIT,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), (_QWEN2_SPLIT,)),
}
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4


@dataclasses.dataclass
class GGUFCheckpoint:
    """A GGUF model as the contents of a Hugging Face Llama checkpoint folder."""

    hf_config: dict[str, Any]
    """A `LlamaConfig`-style `config.json` dict."""
    tensors: dict[str, np.ndarray]
    """Hugging Face tensor names -> float32 arrays in Hugging Face layout ([out, in] for linears)."""
    tokenizer: Any
    """A `transformers.PreTrainedTokenizerFast` with chat template and special tokens set."""


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read a Llama GGUF file into a `GGUFCheckpoint` (float32 tensors, config and tokenizer).

    Raises (all `motab_jax.errors.MotabInputError`s):
        MissingInputError (a FileNotFoundError): `path` does not exist.
        UnsupportedModelError (a ValueError): the architecture, tokenizer model, pre-tokenizer, a tensor type or
            a tensor name is not one this reader supports.
        CheckpointError (a ValueError): the file is corrupt or truncated, or a tensor's shape does not match
            the metadata.
    """
    import gguf

    path = pathlib.Path(path)
    reader = _open(path)
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    float32_keys = {n for n, f in reader.fields.items() if f.types == [gguf.GGUFValueType.FLOAT32]}

    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: unsupported GGUF architecture {architecture!r}; supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    tied = all(t.name != "output.weight" for t in reader.tensors)
    hf_config = _hf_config(path, metadata, float32_keys, tie_word_embeddings=tied)
    tokenizer = _build_tokenizer(path, metadata)
    tensors = _read_tensors(path, reader, hf_config)
    return GGUFCheckpoint(hf_config=hf_config, tensors=tensors, tokenizer=tokenizer)


def _open(path: pathlib.Path) -> Any:
    """A `gguf.GGUFReader` of `path`, which holds the data of every tensor its header lists; a missing,
    unreadable or truncated file raises a `MotabInputError` naming it."""
    import gguf

    if not path.is_file():
        raise MissingInputError(f"GGUF file not found: {str(path)!r}")
    redo = "download or convert it again"
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, struct.error) as e:  # gguf's parser on a corrupt or cut header
        raise CheckpointError(f"{path}: not a readable GGUF file, corrupt or truncated ({type(e).__name__}: {e}); "
                              f"{redo}") from e
    size = path.stat().st_size
    cut = sorted((t.data_offset, t.name, t.data_offset + t.n_bytes) for t in reader.tensors
                 if t.data_offset + t.n_bytes > size)
    if cut:
        _, name, end = cut[0]
        raise CheckpointError(f"{path}: truncated: the file has {size} bytes but tensor {name!r} (the first cut off, "
                              f"of {len(cut)}) ends at byte {end} (an interrupted download or copy?); {redo}")
    return reader


def read_gguf_tokenizer(path: str | os.PathLike) -> Any:
    """Only the tokenizer of a GGUF file (no tensor is read): a `PreTrainedTokenizerFast`."""
    path = pathlib.Path(path)
    reader = _open(path)
    return _build_tokenizer(path, {name: field.contents() for name, field in reader.fields.items()
                                   if name.startswith("tokenizer.")})


def convert_gguf_to_hf(path: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """Write a GGUF model as a Hugging Face checkpoint folder and return that folder.

    Writes `config.json`, `model.safetensors` (float32), the tokenizer files
    (`tokenizer.save_pretrained`) and `generation_config.json`.
    """
    from safetensors.numpy import save_file

    checkpoint = read_gguf(path)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = checkpoint.hf_config
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    generation = {key: cfg[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[key] is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(checkpoint.tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    checkpoint.tokenizer.save_pretrained(str(out))
    return out


def _require(path: pathlib.Path, metadata: dict[str, Any], key: str) -> Any:
    if key not in metadata:
        raise CheckpointError(f"{path}: GGUF metadata key {key!r} is missing")
    return metadata[key]


def _as_float(metadata: dict[str, Any], float32_keys: set[str], key: str, default: float) -> float:
    """A float, with float32 metadata rounded to its shortest repr (1e-05, not 9.99999974e-06)."""
    value = metadata.get(key, default)
    return float(str(np.float32(value))) if key in float32_keys else float(value)


def _hf_config(
    path: pathlib.Path, metadata: dict[str, Any], float32_keys: set[str], *, tie_word_embeddings: bool
) -> dict[str, Any]:
    """Map `llama.*` / `tokenizer.ggml.*` metadata to a `LlamaConfig`-style dict."""
    scaling = metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise UnsupportedModelError(f"{path}: unsupported RoPE scaling type {scaling!r}; supported: ['none']")
    hidden = int(_require(path, metadata, "llama.embedding_length"))
    n_head = int(_require(path, metadata, "llama.attention.head_count"))
    head_dim = metadata.get("llama.attention.key_length", metadata.get("llama.rope.dimension_count"))
    vocab_size = metadata.get("llama.vocab_size", len(metadata.get("tokenizer.ggml.tokens", ())))
    rope_theta = _as_float(metadata, float32_keys, "llama.rope.freq_base", 10000.0)
    token_id = {key: metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding")}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_require(path, metadata, "llama.feed_forward_length")),
        "num_hidden_layers": int(_require(path, metadata, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(metadata.get("llama.attention.head_count_kv", n_head)),
        "head_dim": int(head_dim) if head_dim is not None else hidden // n_head,
        "hidden_act": "silu",
        "rms_norm_eps": _as_float(metadata, float32_keys, "llama.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": int(metadata.get("llama.context_length", 2048)),
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": _optional_int(token_id["bos"]),
        "eos_token_id": _optional_int(token_id["eos"]),
        "pad_token_id": _optional_int(token_id["padding"]),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",
    }


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape for every tensor a checkpoint with this config holds."""
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_rows = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_rows = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
        "self_attn.o_proj.weight": (hidden, q_rows),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    for i in range(cfg["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def _hf_name(gguf_name: str) -> str | None:
    if (match := _BLOCK_NAME.fullmatch(gguf_name)) is not None:
        template = _TENSOR_NAMES.get(f"blk.{{i}}.{match.group(2)}")
        return None if template is None else template.format(i=int(match.group(1)))
    return _TENSOR_NAMES.get(gguf_name)


def _unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp `convert_hf_to_gguf` `permute()` on q/k projection rows.

    llama.cpp rotates interleaved pairs (x0, x1), (x2, x3), ... while Hugging Face rotates the two
    halves of each head, so the converter reorders each head's rows from [half 0 | half 1] to
    interleaved; here they go back.
    """
    rows = weight.shape[0]
    per_head = weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def _read_tensors(path: pathlib.Path, reader: Any, cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """Dequantize, rename and re-layout every tensor, one at a time."""
    from gguf.quants import dequantize

    expected = _expected_shapes(cfg)
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        hf_name = _hf_name(tensor.name)
        if hf_name is None or hf_name not in expected:
            raise UnsupportedModelError(
                f"{path}: unexpected GGUF tensor {tensor.name!r} for a Llama model; "
                f"supported tensors: {sorted(_TENSOR_NAMES)}"
            )
        type_name = tensor.tensor_type.name
        if type_name not in SUPPORTED_TENSOR_TYPES:
            raise UnsupportedModelError(
                f"{path}: tensor {tensor.name!r} has unsupported GGUF tensor type {type_name!r}; "
                f"supported: {list(SUPPORTED_TENSOR_TYPES)}"
            )
        # GGUF lists dims fastest-first (ggml `ne`), so reversed they are numpy's [out, in].
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        weight = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if np.may_share_memory(weight, tensor.data):
            weight = np.array(weight)  # own the memory: the file's memory map is read-only
        weight = weight.astype(np.float32, copy=False)
        if shape != expected[hf_name]:
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} has shape {list(shape)}, expected {list(expected[hf_name])} "
                f"(Hugging Face layout of {hf_name!r}) from the file's metadata"
            )
        if tensor.name.endswith(".attn_q.weight"):
            weight = _unpermute_rope_rows(weight, cfg["num_attention_heads"])
        elif tensor.name.endswith(".attn_k.weight"):
            weight = _unpermute_rope_rows(weight, cfg["num_key_value_heads"])
        tensors[hf_name] = weight
    if missing := sorted(set(expected) - set(tensors)):
        raise CheckpointError(f"{path}: GGUF file lacks tensors for {missing[:5]} ({len(missing)} missing)")
    return tensors


def _build_tokenizer(path: pathlib.Path, metadata: dict[str, Any]) -> Any:
    """A `PreTrainedTokenizerFast` equivalent to the byte-level BPE tokenizer the metadata describes."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = metadata.get("tokenizer.ggml.model")
    if model not in SUPPORTED_TOKENIZER_MODELS:
        raise UnsupportedModelError(
            f"{path}: unsupported GGUF tokenizer model {model!r}; supported: {list(SUPPORTED_TOKENIZER_MODELS)}"
        )
    # Files written before llama.cpp recorded the pre-tokenizer fall back to GPT-2's.
    pre = metadata.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in _PRE_TOKENIZER_SPLITS:
        raise UnsupportedModelError(
            f"{path}: unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(_PRE_TOKENIZER_SPLITS)}"
        )
    tokens: list[str] = _require(path, metadata, "tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in _require(path, metadata, "tokenizer.ggml.merges")]
    token_types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)

    tokenizer = Tokenizer(
        models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in _PRE_TOKENIZER_SPLITS[pre]]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) must match whole in raw text and be skippable on decode.
    tokenizer.add_special_tokens(
        [
            AddedToken(token, normalized=False, special=True)
            for token, kind in zip(tokens, token_types)
            if kind == _TOKEN_TYPE_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(token, normalized=False, special=False)
            for token, kind in zip(tokens, token_types)
            if kind == _TOKEN_TYPE_USER_DEFINED
        ]
    )

    def token(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return None if token_id is None else tokens[int(token_id)]

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
        model_max_length=int(metadata.get("llama.context_length", 2048)),
        clean_up_tokenization_spaces=False,
    )
