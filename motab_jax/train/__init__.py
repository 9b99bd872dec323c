"""Training: losses (SFT cross-entropy and KD divergences, chunked through the LM head), the sharded train
step, optimizer, Orbax checkpoints, the resumable loop, and on-policy rollouts."""

from motab_jax.train.checkpoints import Checkpointer
from motab_jax.train.losses import LOSSES, chunked_loss_sum, get_loss, register_loss
from motab_jax.train.on_policy import RolloutConfig, RolloutSource
from motab_jax.train.optimizer import OptimizerConfig, make_optimizer
from motab_jax.train.step import StepConfig, TrainState, init_train_state, make_train_step
from motab_jax.train.trainer import TrainConfig, TrainingDiverged, fit

__all__ = ["LOSSES", "Checkpointer", "OptimizerConfig", "RolloutConfig", "RolloutSource", "StepConfig", "TrainConfig",
           "TrainState", "TrainingDiverged", "chunked_loss_sum", "fit", "get_loss", "init_train_state", "make_optimizer",
           "make_train_step", "register_loss"]
