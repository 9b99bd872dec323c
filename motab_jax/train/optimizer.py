"""AdamW with warmup + cosine decay to a minimum learning rate and global-norm clipping (the paper's recipe)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Defaults: spec section 5 (AdamW 0.9 / 0.95 / 1e-8, weight decay 0.1, lr 5e-5 cosine to 1e-6, 5% warmup,
    clip 1.0)."""

    learning_rate: float = 5e-5
    min_learning_rate: float = 1e-6
    warmup_ratio: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError(f"min_learning_rate={self.min_learning_rate} must be in [0, learning_rate]")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1={self.beta1}, beta2={self.beta2} must be in [0, 1)")


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over `warmup_ratio` of the steps, then cosine decay to `min_learning_rate`."""
    warmup = int(round(config.warmup_ratio * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else config.learning_rate, peak_value=config.learning_rate,
        warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=config.min_learning_rate)


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices and embeddings, not on norms or biases (as the Hugging Face Trainer does)."""
    def decays(path: tuple, _: Any) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        name = names[-2] if names and names[-1] == "value" and len(names) > 1 else (names[-1] if names else "")
        return not ("norm" in name or name.startswith("b"))  # bq, bk, bv, bo, b_gate, b_up, b_down
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(config, total_steps)
    adamw = optax.adamw(schedule, b1=config.beta1, b2=config.beta2, eps=config.eps, weight_decay=config.weight_decay,
                        mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw) if config.clip_norm else adamw
    return tx, schedule
