"""AdamW with warmup + cosine decay to a minimum learning rate and global-norm clipping (the paper's recipe)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

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
        problems = optimizer_problems(dataclasses.asdict(self))
        if problems:
            raise ValueError("; ".join(problems))


def optimizer_problems(values: Mapping[str, Any]) -> list[str]:
    """Every invalid OptimizerConfig value among `values` (fields not given are not checked), with its range."""
    problems = []

    def num(field: str) -> float:
        value = values.get(field, 0)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")

    def need(ok: bool, field: str, rule: str) -> None:
        if field in values and not ok:
            problems.append(f"{field}={values[field]!r}: must be {rule}")

    need(num("learning_rate") > 0, "learning_rate", "> 0")
    need(0 <= num("min_learning_rate") <= num("learning_rate"), "min_learning_rate", "in [0, learning_rate]")
    need(0 <= num("warmup_ratio") < 1, "warmup_ratio", "in [0, 1)")
    need(num("weight_decay") >= 0, "weight_decay", ">= 0")
    for field in ("beta1", "beta2"):
        need(0 <= num(field) < 1, field, "in [0, 1)")
    need(num("eps") > 0, "eps", "> 0")
    need(num("clip_norm") >= 0, "clip_norm", ">= 0 (0 = no clipping)")
    return problems


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
    # Clipping stays in the chain when off (an infinite bound passes every finite update unchanged), so the
    # optimizer state has one structure and a checkpoint restores after clip_norm was turned on or off.
    tx = optax.chain(optax.clip_by_global_norm(config.clip_norm or float("inf")), adamw)
    return tx, schedule
