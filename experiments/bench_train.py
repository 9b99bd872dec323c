"""Training-step benchmark: tokens/s and MFU of our sharded SFT step, and (with torch installed) a Hugging
Face transformers + PyTorch AdamW step on the same shape in the same run.

    python experiments/bench_train.py                         # tiny model on CPU
    python experiments/bench_train.py --preset 1.5b --seq-len 4096 --batch 8 --fsdp -1   # on a GPU/TPU box

Random weights, packed random tokens, full loss mask; float32 master weights with bf16 compute on
accelerators (float32 on CPU). Timings exclude compilation (two warm-up steps) and are medians of the
measured steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from report import print_table  # noqa: E402
import numpy as np  # noqa: E402

from motab_jax.models import MeshConfig, ModelConfig, init_random, make_mesh  # noqa: E402
from motab_jax.train.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from motab_jax.train.step import StepConfig, init_train_state, make_train_step  # noqa: E402
from motab_jax.train.trainer import PEAK_FLOPS, flops_per_token, place_batch  # noqa: E402

PRESETS = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=32),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                 num_kv_heads=2, head_dim=128),
}


def torch_step_tokens_per_s(shape: dict, batch: int, seq_len: int, steps: int) -> float | None:
    """The same model as a transformers Qwen2ForCausalLM, AdamW, bf16 autocast, sdpa attention."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = transformers.Qwen2Config(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"], head_dim=shape["head_dim"], attn_implementation="sdpa")
    model = transformers.AutoModelForCausalLM.from_config(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=device == "cuda")
    ids = torch.randint(0, shape["vocab_size"], (batch, seq_len), device=device)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return batch * seq_len / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--data", type=int, default=-1)
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    accelerator = jax.default_backend() != "cpu"
    shape = PRESETS[args.preset]
    cfg = ModelConfig(model_type="qwen2", qkv_bias=True, param_dtype="float32",
                      compute_dtype="bfloat16" if accelerator else "float32", remat=args.remat,
                      max_position_embeddings=max(args.seq_len, 4096), **shape)
    mesh = make_mesh(MeshConfig(data=args.data, fsdp=args.fsdp, tensor=args.tensor))
    model = init_random(cfg, seed=0, mesh=mesh)
    tx, _ = make_optimizer(OptimizerConfig(), 1000)
    graphdef, state = init_train_state(model, tx)
    step = make_train_step(graphdef, tx, StepConfig(micro_batches=args.micro_batches))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, shape["vocab_size"], (args.batch, args.seq_len)).astype(np.int32)
    host = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": np.ones(tokens.shape, np.float32),
            "segment_ids": np.ones(tokens.shape, np.int32),
            "positions": np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), tokens.shape).copy()}
    batch = place_batch(host, mesh)
    times = []
    for i in range(args.steps + 2):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        if i >= 2:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_s = args.batch * args.seq_len / seconds
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), 0.0) * jax.device_count()
    rows = [("device", f"{jax.device_count()} x {kind}"), ("mesh", str(dict(mesh.shape))),
            ("model", f"{args.preset} ({cfg.num_params / 1e6:.1f}M params), seq {args.seq_len}, batch {args.batch}"),
            ("motab-jax step, s", f"{seconds:.4f}"), ("motab-jax tokens/s", f"{tokens_per_s:,.0f}"),
            ("motab-jax MFU", f"{tokens_per_s * flops_per_token(model, args.seq_len) / peak:.1%}" if peak else
             "n/a (unknown peak FLOP/s for this device)")]
    if not args.no_torch:
        torch_tps = torch_step_tokens_per_s(shape, args.batch, args.seq_len, args.steps)
        if torch_tps:
            rows += [("transformers + PyTorch tokens/s", f"{torch_tps:,.0f}"),
                     ("ratio (ours / PyTorch)", f"{tokens_per_s / torch_tps:.2f}x")]
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
