"""The training loop shared by SFT and on-policy KD: resume, step, metrics, checkpoints, NaN guard, export.

`fit(model, batches, config, run_dir)` trains on any resumable batch source (an object with `__iter__`,
`state()`, `restore(state)` and `total_steps`): the SFT `BatchIterator`, or the on-policy rollout source of
`motab_jax.train.on_policy`. Metrics per step (loss, target tokens, grad norm, lr, tokens/s, MFU) go to a
progress bar, to `metrics.jsonl` and to TensorBoard (`tensorboard --logdir <run_dir>/tensorboard`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from motab_jax.models.export import export_hf
from motab_jax.models.sharding import logical_to_spec
from motab_jax.models.transformer import Decoder
from motab_jax.train.checkpoints import Checkpointer, abstract_like
from motab_jax.train.optimizer import OptimizerConfig, make_optimizer
from motab_jax.train.step import StepConfig, init_train_state, make_train_step

log = logging.getLogger("motab_jax")

# Dense bf16 peak FLOP/s per device, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A800": 312e12, "L4": 121e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


class BatchSource(Protocol):
    total_steps: int

    def __iter__(self) -> Iterable[dict[str, np.ndarray]]: ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    optimizer: OptimizerConfig = OptimizerConfig()
    micro_batches: int = 1
    chunk_size: int = 512
    save_every: int = 100
    keep_last: int = 2
    async_checkpoints: bool = True
    max_steps: int = 0  # 0: the batch source's total_steps
    peak_flops: float = 0.0  # per device; 0: looked up from the device kind (MFU is omitted when unknown)
    export: bool = True  # write the trained model to <run_dir>/hf at the end


def flops_per_token(model: Decoder, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (matmul parameters) + 12 L H Dh T (attention), as in PaLM's MFU."""
    c = model.config
    matmul_params = c.num_params - c.vocab_size * c.hidden_size * (0 if c.tie_word_embeddings else 1)
    return 6 * matmul_params + 12 * c.num_layers * c.num_heads * c.head_dim * seq_len


def peak_flops(config: TrainConfig) -> float:
    if config.peak_flops:
        return config.peak_flops * jax.device_count()
    kind = jax.devices()[0].device_kind
    match = next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), 0.0)
    return match * jax.device_count()


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh | None) -> dict[str, jax.Array]:
    """This process's rows -> global arrays split over (data, fsdp)."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    out = {}
    for key, local in batch.items():
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        spec = logical_to_spec(("batch", "length"), global_shape, mesh)
        out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local, global_shape)
    return out


class MetricsWriter:
    def __init__(self, run_dir: Path):
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if jax.process_index() == 0 else None
        self.tb = None
        if jax.process_index() == 0:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # TensorBoard logging is optional; metrics.jsonl always has everything
                log.warning("tensorboardX is not installed: metrics go to metrics.jsonl only")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        if self.tb:
            for key, value in metrics.items():
                self.tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def fit(model: Decoder, batches: BatchSource, config: TrainConfig, run_dir: str | os.PathLike, *,
        tokenizer: Any = None, mesh: Mesh | None = None, step_config: StepConfig | None = None,
        teacher: Decoder | None = None, progress: bool = True) -> tuple[Decoder, list[dict[str, float]]]:
    """Train `model` in place on `batches`; resumes from the latest checkpoint in `run_dir/checkpoints`.

    Returns the trained model and the metrics of the steps run in this call. With `teacher`, the step's
    loss is a divergence to the teacher's distribution (on-policy KD); otherwise cross-entropy (SFT).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    total = config.max_steps or batches.total_steps
    if total < 1:
        raise ValueError("nothing to train: the data gives 0 steps (too few examples for one global batch?)")
    tx, schedule = make_optimizer(config.optimizer, total)
    graphdef, state = init_train_state(model, tx)
    step_config = step_config or StepConfig(micro_batches=config.micro_batches, chunk_size=config.chunk_size)
    teacher_graphdef, teacher_params = nnx.split(teacher) if teacher is not None else (None, None)
    step_fn = make_train_step(graphdef, tx, step_config, teacher_graphdef)
    checkpoints = Checkpointer(run_dir / "checkpoints", save_every=config.save_every, keep_last=config.keep_last,
                               async_save=config.async_checkpoints)
    latest = checkpoints.latest_step()
    if latest is not None:
        state, data_state, meta = checkpoints.restore(latest, abstract_like(state))
        batches.restore(data_state)
        log.info("resumed from checkpoint %d (%s)", latest, run_dir / "checkpoints")
    start = int(state.step)
    writer = MetricsWriter(run_dir)
    peak = peak_flops(config)
    history: list[dict[str, float]] = []
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not progress)
    last_good = latest
    try:
        iterator = iter(batches)
        for step in range(start, total):
            if getattr(batches, "on_policy", False):
                nnx.update(model, state.params)  # rollouts come from the current student
            try:
                host_batch = next(iterator)
            except StopIteration:
                break
            tick = time.perf_counter()
            state, metrics = step_fn(state, place_batch(host_batch, mesh), teacher_params)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            seconds = time.perf_counter() - tick
            if not math.isfinite(metrics["loss"]) or not math.isfinite(metrics["grad_norm"]):
                raise FloatingPointError(
                    f"loss {metrics['loss']} / grad norm {metrics['grad_norm']} at step {step + 1}; the last good "
                    f"checkpoint is {last_good} in {run_dir / 'checkpoints'} (rerun resumes from it): lower the "
                    "learning rate or check the data")
            tokens = float(host_batch["segment_ids"].astype(bool).sum()) * jax.process_count()
            metrics.update(lr=float(schedule(step)), seconds=seconds, tokens_per_s=tokens / seconds)
            if peak:
                seq_len = host_batch["tokens"].shape[1]
                metrics["mfu"] = tokens * flops_per_token(model, seq_len) / seconds / peak
            writer.write(step + 1, metrics)
            history.append(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                            tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update(1)
            meta = {"step": step + 1, "loss": metrics["loss"]}
            if checkpoints.save(step + 1, state, batches.state(), meta):
                last_good = step + 1
        final = int(state.step)
        checkpoints.wait()
        if checkpoints.latest_step() != final:
            checkpoints.save(final, state, batches.state(), {"step": final}, force=True)
    finally:
        bar.close()
        checkpoints.close()
        writer.close()
    nnx.update(model, state.params)
    if config.export and tokenizer is not None:
        export_hf(model, tokenizer, run_dir / "hf")
    return model, history
