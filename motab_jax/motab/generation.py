"""Plain sampling from one model on the slot engine: `generate`, evaluation and on-policy rollouts.

The engine with the `Plain` policy: no teacher, no steps (a delimiter that never matches, one step up to the
budget), continuous batching over `num_slots` slots on a paged cache. Random keys are those of the static
sampler (`sampling.sampler.sample_batch`): row key = fold_in(key(seed), row id), token n drawn with
fold_in(row key, n), so a row's completion does not depend on the batch, the slot or the order rows finish.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from motab_jax.models.transformer import Decoder
from motab_jax.motab.driver import EngineStats, Job, engine_groups, run_engine
from motab_jax.motab.engine import EngineSpec
from motab_jax.motab.policies import Plain
from motab_jax.motab.pool import activation_margin, loaded_budget, plan_pool
from motab_jax.motab.state import FINISH_EOS
from motab_jax.motab.pool import weight_bytes
from motab_jax.motab.synthesize import kv_token_bytes
from motab_jax.motab.transition import EngineTables
from motab_jax.sampling.rules import Rule
from motab_jax.sampling.sampler import checked_prompt_width

# Tokens a slot samples per device iteration (the student's k-token draft loop, nothing to verify).
TOKENS_PER_ITERATION = 8


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How plain generation runs on the engine (what it samples is the caller's `Rule`)."""

    num_slots: int = 64  # rows decoded at once; a finished row is replaced at once
    page_size: int = 16
    num_pages: int = 0  # 0: from memory_budget_gb or the devices' memory (see motab.pool)
    memory_budget_gb: float = 0.0
    iterations_per_sync: int = 32
    paged_impl: str = "auto"
    # What makes the pools of one engine over several processes equal, quoted when they differ (the caller's knobs).
    pool_hint: str = "set GenerationConfig.num_pages (the pool's size) when the hosts' free memory differs"


@dataclasses.dataclass
class RowResult:
    tokens: np.ndarray  # [n] int32 generated ids, the stop token included when one ended the row
    logprobs: np.ndarray  # [n] float32: log pi(token) at temperature 1
    hit_stop: bool  # ended by a stop token (else by max_new_tokens)


def generate_rows(model: Decoder, prompts: Sequence[Sequence[int]], row_ids: Sequence[int], *, rule: Rule,
                  max_new_tokens: int, stop_tokens: Sequence[int], seed: int,
                  config: GenerationConfig = GenerationConfig(),
                  stats: EngineStats | None = None) -> Iterator[tuple[int, RowResult]]:
    """Sample a continuation of every prompt; yields (index into `prompts`, result) as rows finish."""
    if not prompts:
        return
    lengths = [len(p) for p in prompts]
    k = TOKENS_PER_ITERATION
    max_len = checked_prompt_width(model, lengths, max_new_tokens) + max_new_tokens + k + 2
    spec = EngineSpec(policy=Plain(), student_rule=rule, teacher_rule=rule, draft_rule=rule, draft_len=k,
                      entropy_top_k=1, step_cap=max_new_tokens, traj_cap=max_new_tokens, teacher_min_budget=1,
                      max_steps=1)
    vocab = model.config.output_vocab_size
    # A delimiter automaton that never completes: the whole completion is one step.
    tables = EngineTables(jnp.zeros((1, vocab), jnp.int32), jnp.zeros((1, vocab), bool),
                          jnp.asarray(sorted(set(int(t) for t in stop_tokens)) or [-1], jnp.int32))
    num_slots = min(config.num_slots, len(prompts))
    weights, groups = weight_bytes(model), engine_groups(model)
    # Sized from the memory free now (plus the model's weights): during KD the training state is resident.
    pool = plan_pool(num_slots=num_slots, page_size=config.page_size, max_len=max_len, max_prompt_len=max(lengths),
                     token_bytes=kv_token_bytes([model.config]), num_pages=config.num_pages,
                     memory_budget_gb=config.memory_budget_gb, weight_bytes=weights,
                     margin_bytes=activation_margin(num_slots, k, vocab), device_bytes=loaded_budget(weights, groups),
                     groups=groups)
    jobs = [Job(i, tuple(int(t) for t in p), int(r)) for i, (p, r) in enumerate(zip(prompts, row_ids))]
    for job, row in run_engine(spec, model, model, tables, jobs, pool=pool, paged_impl=config.paged_impl,
                               iterations_per_sync=config.iterations_per_sync, seed=seed, stats=stats,
                               pool_hint=config.pool_hint):
        n = int(row["out_len"])
        yield job.index, RowResult(row["out_tokens"][:n].astype(np.int32), row["out_logp"][:n].astype(np.float32),
                                   int(row["finish"]) == FINISH_EOS)
