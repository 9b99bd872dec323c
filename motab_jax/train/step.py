"""The pure, jitted train step: (train state, batch[, teacher params]) -> (train state, metrics).

Parameters are float32 master weights; the model computes in its `compute_dtype` (bf16 on accelerators).
The batch is split into `micro_batches` accumulated under `lax.scan`; the loss is the sum of per-token
losses over the GLOBAL batch divided by its number of target tokens (not a mean of per-sequence means).
Sharding comes from the arrays: parameters and optimizer moments follow the logical-axis rules, the batch is
split over (data, fsdp); XLA inserts the collectives.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from motab_jax.train.losses import chunked_loss_sum

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    params: Any  # nnx.State of float32 parameters
    opt_state: Any
    step: jax.Array  # [] int32


@dataclasses.dataclass(frozen=True)
class StepConfig:
    micro_batches: int = 1  # gradient accumulation: the global batch is split into this many parts
    chunk_size: int = 512  # sequence chunk for the loss through the LM head
    loss: str = "ce"  # "ce" (SFT) or a divergence of motab_jax.train.losses (on-policy KD)
    loss_params: tuple[tuple[str, float], ...] = ()


def all_finite(tree: Any) -> jax.Array:
    """[] float32: 1 when every float in `tree` is finite, else 0. A finite loss does not make a finite state:
    an update can overflow the parameters, or Adam's second moment (grad^2), while the loss it came from was
    finite; a checkpoint of such a state would poison every resume from it."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])).astype(jnp.float32) if leaves \
        else jnp.ones((), jnp.float32)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[Any, TrainState]:
    """Split `model` into (graphdef, TrainState); the optimizer moments inherit the parameters' shardings."""
    graphdef, params = nnx.split(model)
    opt_state = jax.jit(tx.init)(params)
    return graphdef, TrainState(params, opt_state, jnp.zeros((), jnp.int32))


def _split_micro(batch: dict[str, jax.Array], micro: int) -> dict[str, jax.Array]:
    def split(x):
        if x.shape[0] % micro:
            raise ValueError(f"batch of {x.shape[0]} rows is not divisible into {micro} micro-batches")
        return x.reshape((micro, x.shape[0] // micro) + x.shape[1:])
    return {k: split(v) for k, v in batch.items()}


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, config: StepConfig,
                    teacher_graphdef: Any = None):
    """A jitted `step(state, batch, teacher_params=None) -> (state, metrics)` (state donated)."""

    def micro_loss(params, teacher_params, mb):
        model = nnx.merge(graphdef, params)
        hidden = model.hidden_states(mb["tokens"], mb["positions"], mb["segment_ids"])
        kwargs: dict[str, Any] = dict(config.loss_params)
        if teacher_graphdef is not None:
            teacher = nnx.merge(teacher_graphdef, teacher_params)
            teacher_hidden = teacher.hidden_states(mb["tokens"], mb["positions"], mb["segment_ids"])
            kwargs.update(teacher_head=teacher.logits, teacher_hidden=jax.lax.stop_gradient(teacher_hidden))
        else:
            kwargs.update(targets=mb["targets"])
        return chunked_loss_sum(model.logits, hidden, mb["loss_mask"], loss=config.loss,
                                chunk_size=config.chunk_size, **kwargs)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: TrainState, batch: dict[str, jax.Array], teacher_params: Any = None):
        batch = {k: batch[k] for k in BATCH_KEYS}
        total_weight = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        micro = _split_micro(batch, config.micro_batches)
        grad_fn = jax.value_and_grad(lambda p, mb: micro_loss(p, teacher_params, mb)[0])

        def accumulate(carry, mb):
            grads, loss_sum = carry
            loss, g = grad_fn(state.params, mb)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + loss), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (grads, loss_sum), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), micro)
        scale = 1.0 / jnp.maximum(total_weight, 1.0)
        grads = jax.tree.map(lambda g: g * scale, grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum * scale, "grad_norm": grad_norm, "target_tokens": total_weight,
                   "param_norm": optax.global_norm(params), "state_finite": all_finite((params, opt_state))}
        return TrainState(params, opt_state, state.step + 1), metrics

    return step
