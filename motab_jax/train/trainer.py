"""The training loop shared by SFT and on-policy KD: resume, step, metrics, checkpoints, NaN guard, export.

`fit(model, batches, config, run_dir)` trains on any resumable batch source (an object with `__iter__`,
`state()`, `restore(state)` and `total_steps`): the SFT `BatchIterator`, or the on-policy rollout source of
`motab_jax.train.on_policy`. Metrics per step (loss, target tokens, grad norm, lr, tokens/s, MFU) go to a
progress bar, to `metrics.jsonl` and to TensorBoard (`tensorboard --logdir <run_dir>/tensorboard`).

NaN guard: a step whose loss or gradient norm is not finite, or whose update leaves a non-finite parameter or
optimizer state, stops training with `TrainingDiverged`. Only finite states are checkpointed, and a checkpoint
counts as good once the step from it was finite (checkpoints.py), so after a stop the newest checkpoint left is
the last good one: rerunning (e.g. with a lower learning rate) resumes from it, with the data position saved with
it, and reproduces the run that never saw the failure. metrics.jsonl is cut back to the resumed step.
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

from motab_jax.errors import MotabInputError
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


class TrainingDiverged(MotabInputError, FloatingPointError):
    """The loss, gradients or state stopped being finite; the message names the step and the checkpoint a rerun
    resumes from."""


def _cut_metrics(path: Path, step: int) -> None:
    """Keep only the lines of steps <= `step` (the state a resume starts from): the steps after it are redone."""
    if not path.exists():
        return
    kept = []
    for line in path.read_bytes().split(b"\n"):
        try:
            if line.strip() and int(json.loads(line)["step"]) <= step:
                kept.append(line + b"\n")
        except (ValueError, KeyError, TypeError):  # a torn last line of a killed job
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(kept))
    tmp.replace(path)


class MetricsWriter:
    def __init__(self, run_dir: Path, start_step: int = 0):
        if jax.process_index() == 0:
            _cut_metrics(run_dir / "metrics.jsonl", start_step)
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


def _diverged(step: int, metrics: dict[str, float], state_finite: bool, norms: list[tuple[int, float]],
              checkpoints: Checkpointer) -> TrainingDiverged:
    """The stop at `step`, after dropping the newest checkpoint if `step` (which ran from its state) failed."""
    if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
        what = (f"the update of step {step} left a non-finite parameter or optimizer state (loss "
                f"{metrics['loss']:.4g}, grad norm {metrics['grad_norm']:.4g})")
        checkpoints.confirm(step - 1)  # the state before it gave a finite step
    else:
        what = f"loss {metrics['loss']} / grad norm {metrics['grad_norm']} at step {step}"
    good = checkpoints.discard_unconfirmed()
    growth = ""
    if norms and norms[-1][1] > 10 * norms[0][1]:
        growth = (f"; the parameter norm grew from {norms[0][1]:.3g} (step {norms[0][0]}) to {norms[-1][1]:.3g} "
                  f"(step {norms[-1][0]})")
    where = (f"the last good checkpoint is {good} in {checkpoints.directory} (a rerun resumes from it, at the data "
             "position saved with it)" if good is not None else
             f"no good checkpoint is left in {checkpoints.directory} (a rerun starts from the initial weights)")
    return TrainingDiverged(f"training stopped: {what}{growth}; {where}: lower the learning rate, or check the data")


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
    writer = MetricsWriter(run_dir, start)
    peak = peak_flops(config)
    history: list[dict[str, float]] = []
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not progress)
    norms: list[tuple[int, float]] = []  # (step, parameter norm after it): how a divergence built up
    failed = True
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
            state_finite = metrics.pop("state_finite") == 1.0
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]) and state_finite):
                raise _diverged(step + 1, metrics, state_finite, norms, checkpoints)
            checkpoints.confirm(step)  # the state after `step` gave a finite step: its checkpoint is good
            norms = (norms + [(step + 1, metrics["param_norm"])])[-64:]
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
            meta = {"step": step + 1, "loss": metrics["loss"], "param_norm": metrics["param_norm"]}
            checkpoints.save(step + 1, state, batches.state(), meta)
        final = int(state.step)
        checkpoints.wait()
        if checkpoints.latest_step() != final:
            checkpoints.save(final, state, batches.state(), {"step": final}, force=True)
        checkpoints.confirm(final)  # the trained state (finite: checked after its step)
        failed = False
    finally:
        bar.close()
        writer.close()
        try:
            checkpoints.close()
        except Exception:  # noqa: BLE001 - the error already on its way out says more (it is the same save)
            if not failed:
                raise
    nnx.update(model, state.params)
    if config.export and tokenizer is not None:
        export_hf(model, tokenizer, run_dir / "hf")
    return model, history
