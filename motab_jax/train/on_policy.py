"""On-policy distillation data: batches of the current student's own rollouts (spec section 6).

Each step takes the next `prompts_per_step` prompts (a seeded permutation per epoch), samples
`samples_per_prompt` completions from the student as it is now, and lays them out as rows of prompt +
completion; the KD loss is taken on the completion tokens only (the positions that predict them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from motab_jax.models.transformer import Decoder
from motab_jax.sampling.rules import make_rule
from motab_jax.models.loading import resharded
from motab_jax.models.sharding import SAMPLING_RULES
from motab_jax.motab.generation import GenerationConfig, generate_rows


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = 8
    samples_per_prompt: int = 5
    max_new_tokens: int = 32768
    temperature: float = 0.6
    top_p: float = 0.95
    seq_len: int = 34816  # prompt (max_prompt_len 2048) + completion (32768); longer rows are truncated
    epochs: int = 10
    seed: int = 0


def rollout_rows(prompt: Sequence[int], completion: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
    """One row: tokens, loss mask on the positions that predict a completion token, segment ids, positions."""
    tokens = (list(prompt) + list(completion))[:seq_len]
    row = {k: np.zeros(seq_len, np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    row["tokens"][:len(tokens)] = tokens
    row["targets"][:len(tokens) - 1] = tokens[1:]
    row["segment_ids"][:len(tokens)] = 1
    row["positions"][:len(tokens)] = np.arange(len(tokens))
    mask = np.zeros(seq_len, np.float32)
    mask[max(len(prompt) - 1, 0):len(tokens) - 1] = 1.0
    row["loss_mask"] = mask
    return row


class RolloutSource:
    """A resumable batch source for `trainer.fit` that samples from the student being trained."""

    on_policy = True

    def __init__(self, student: Decoder, prompts: Sequence[Sequence[int]], stop_tokens: Sequence[int],
                 config: RolloutConfig):
        if len(prompts) < config.prompts_per_step:
            raise ValueError(f"{len(prompts)} prompts < prompts_per_step={config.prompts_per_step}")
        if config.prompts_per_step % jax.process_count():
            raise ValueError(f"prompts_per_step={config.prompts_per_step} must divide over "
                             f"{jax.process_count()} processes")
        self.student, self.prompts, self.stop_tokens, self.config = student, list(prompts), list(stop_tokens), config
        self.steps_per_epoch = len(self.prompts) // config.prompts_per_step
        self.total_steps = self.steps_per_epoch * config.epochs
        self.epoch, self.index = 0, 0
        self.rule = make_rule(config.temperature, config.top_p)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        c = self.config
        while self.epoch < c.epochs:
            order = np.random.default_rng([c.seed, self.epoch]).permutation(len(self.prompts))
            while self.index < self.steps_per_epoch:
                step = self.epoch * self.steps_per_epoch + self.index
                chosen = order[self.index * c.prompts_per_step:(self.index + 1) * c.prompts_per_step]
                local = np.array_split(chosen, jax.process_count())[jax.process_index()]
                prompts = [self.prompts[i] for i in local for _ in range(c.samples_per_prompt)]
                row_ids = [int(i) * c.samples_per_prompt + j for i in local for j in range(c.samples_per_prompt)]
                # Rollouts decode with the sampling placement (tensor parallel), not the training one.
                completions = dict(generate_rows(
                    resharded(self.student, SAMPLING_RULES), prompts, row_ids, rule=self.rule, max_new_tokens=c.max_new_tokens,
                    stop_tokens=self.stop_tokens, seed=c.seed * 1_000_003 + step,
                    config=GenerationConfig(num_slots=len(prompts))))
                rows = [rollout_rows(p, completions[r].tokens, c.seq_len) for r, p in enumerate(prompts)]
                self.index += 1
                yield {k: np.stack([row[k] for row in rows]) for k in rows[0]}
            self.epoch, self.index = self.epoch + 1, 0
