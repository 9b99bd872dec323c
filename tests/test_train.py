"""SFT and on-policy KD training: fitting, sharding, accumulation, normalisation, exact resume, NaN guard and
rollback, full disk."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from motab_jax.data import BatchIterator, Example, SFTDataset, build_sft_rows
from motab_jax.errors import EnvironmentProblem
from motab_jax.models import MeshConfig, ModelConfig, init_random, make_mesh
from motab_jax.models.transformer import param_values
from motab_jax.text import byte_level_tokenizer
from motab_jax.train.on_policy import RolloutConfig, RolloutSource
from motab_jax.train.optimizer import OptimizerConfig, make_optimizer
from motab_jax.train.step import StepConfig, init_train_state, make_train_step
from motab_jax.train.trainer import TrainConfig, TrainingDiverged, fit, place_batch

TOK = byte_level_tokenizer()
SEQ = 24


def _model(seed: int = 0, mesh=None, layers: int = 2, width: int = 64):
    cfg = ModelConfig("qwen3", vocab_size=TOK.vocab_size + 5, hidden_size=width, intermediate_size=2 * width,
                      num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=width // 4, qk_norm=True,
                      logits_vocab_size=len(TOK), max_position_embeddings=512)
    return init_random(cfg, seed=seed, mesh=mesh)


def _examples(n: int = 160) -> list[Example]:
    """Addition problems whose answers follow one fixed format: learnable by a tiny model."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        a, b = rng.integers(0, 10, 2)
        out.append(Example(id=str(i), prompt=f"{a}+{b}", response=f"={a + b}.", prompt_rendered=True))
    return out


def _batches(global_batch: int = 8, epochs: int = 3, seed: int = 0) -> BatchIterator:
    rows, _ = build_sft_rows(_examples(), TOK, SEQ, apply_chat_template=False)
    return BatchIterator(SFTDataset(rows), global_batch, seed=seed, num_epochs=epochs)


def _cfg(**changes) -> TrainConfig:
    base = TrainConfig(optimizer=OptimizerConfig(learning_rate=3e-3, min_learning_rate=3e-4, warmup_ratio=0.1),
                       save_every=1000, async_checkpoints=False, export=False, chunk_size=32)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module", autouse=True)
def _compile_once(tmp_path_factory):
    """Each `fit` builds a new jitted step, which JAX's in-memory cache does not share between calls; the persistent
    cache (keyed by the compiled program) does, so fits of one configuration compile once. (When test_run.py ran
    first in this process, the job's own cache is already in use and this changes nothing.)"""
    saved = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])


def test_tiny_model_fits_a_small_dataset(tmp_path):
    # Per target token the response "=c." has 3 symbols plus EOS; only the sum digit is uncertain given the
    # prompt, so a model that learned the format and the sums is far below the uniform ln(262) = 5.6 nats;
    # 1.0 nats/token means most of the structure was learned.
    model, history = fit(_model(), _batches(epochs=12), _cfg(), tmp_path, progress=False)
    assert history[0]["loss"] > 4.0
    assert history[-1]["loss"] < 1.0, [round(h["loss"], 3) for h in history]
    assert all(h["target_tokens"] > 0 and h["grad_norm"] > 0 and h["tokens_per_s"] > 0 for h in history)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(history) and "lr" in json.loads(lines[0])


@functools.lru_cache(maxsize=None)
def _single_device_run():
    return _steps(_model(), _batches())


def _steps(model, batches, micro: int = 1, steps: int = 2, mesh=None):
    tx, _ = make_optimizer(OptimizerConfig(learning_rate=1e-3), 10)
    graphdef, state = init_train_state(model, tx)
    step = make_train_step(graphdef, tx, StepConfig(micro_batches=micro, chunk_size=16))
    losses = []
    for batch, _ in zip(batches, range(steps)):
        state, metrics = step(state, place_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return losses, {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(state.params)}


@pytest.mark.parametrize("mesh_config", [  # the fast set keeps the mesh that uses all three axes
    pytest.param(MeshConfig(data=1, fsdp=8), marks=pytest.mark.slow),
    pytest.param(MeshConfig(data=2, tensor=4), marks=pytest.mark.slow), MeshConfig(data=2, fsdp=2, tensor=2)])
def test_sharded_step_equals_single_device(mesh_config):
    single_losses, single_params = _single_device_run()
    mesh = make_mesh(mesh_config)
    losses, params = _steps(_model(mesh=mesh), _batches(), mesh=mesh)
    np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
    # Adam divides by sqrt(v): float32 reduction-order noise in near-zero gradients shows up as ~1e-6
    # parameter differences; 1e-5 is still 1% of one step's largest update (lr 1e-3).
    for key in single_params:
        np.testing.assert_allclose(params[key], single_params[key], atol=1e-5, err_msg=str(key))


def test_gradient_accumulation_equals_the_large_batch():
    big_losses, big_params = _single_device_run()
    acc_losses, acc_params = _steps(_model(), _batches(global_batch=8), micro=4)
    np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)
    for key in big_params:
        np.testing.assert_allclose(acc_params[key], big_params[key], atol=1e-5, err_msg=str(key))


def test_loss_is_normalised_by_target_tokens_of_the_global_batch():
    model = _model()
    batch = next(iter(_batches()))
    batch["loss_mask"][0] = 0.0  # an empty row must not count as a "sequence mean"
    batch["loss_mask"][1, 5:] = 0.0
    logits = np.asarray(model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
                              jnp.asarray(batch["segment_ids"])), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    expected = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    tx, _ = make_optimizer(OptimizerConfig(), 10)
    graphdef, state = init_train_state(model, tx)
    _, metrics = make_train_step(graphdef, tx, StepConfig(chunk_size=16))(state, place_batch(batch, None))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    assert float(metrics["target_tokens"]) == batch["loss_mask"].sum()


class _Interrupted(Exception):
    pass


class _StopAfter:
    """A batch source that dies after `n` batches, as a killed job would."""

    def __init__(self, inner, n: int):
        self.inner, self.n, self.total_steps = inner, n, inner.total_steps

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if i == self.n:
                raise _Interrupted
            yield batch

    def state(self):
        return self.inner.state()

    def restore(self, state):
        self.inner.restore(state)


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    _, full = fit(_model(), _batches(epochs=2), _cfg(save_every=1), tmp_path / "full", progress=False)
    with pytest.raises(_Interrupted):
        fit(_model(), _StopAfter(_batches(epochs=2), 5), _cfg(save_every=1), tmp_path / "cut", progress=False)
    model, rest = fit(_model(), _batches(epochs=2), _cfg(save_every=1), tmp_path / "cut", progress=False)
    assert len(rest) == len(full) - 5
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[5:]]
    assert [h["grad_norm"] for h in rest] == [h["grad_norm"] for h in full[5:]]


class _PoisonAt:
    """A batch source whose batch `step` (1-based) has a NaN loss weight: a corrupt batch or a numeric fault that
    makes that step's loss and gradients NaN once (the clean source is used on the rerun)."""

    def __init__(self, inner, step: int):
        self.inner, self.step, self.total_steps = inner, step, inner.total_steps

    def __iter__(self):
        for i, batch in enumerate(self.inner, 1):
            if i == self.step:
                batch = dict(batch, loss_mask=batch["loss_mask"].copy())
                batch["loss_mask"][0, 0] = np.nan
            yield batch

    def state(self):
        return self.inner.state()

    def restore(self, state):
        self.inner.restore(state)


def _small():
    """The tiny model with one narrow layer: the NaN and disk tests are about the loop, not the model (fast)."""
    return _model(layers=1, width=32)


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in param_values(model).items()}


# One configuration (one compiled program) for the NaN, divergence and full-disk tests' sane runs.
ROLLBACK = _cfg(save_every=2, max_steps=8)


def test_a_nan_at_step_s_rolls_back_to_the_last_good_checkpoint_and_resumes_as_if_it_never_happened(tmp_path):
    config = ROLLBACK
    clean_model, clean = fit(_small(), _batches(epochs=2), config, tmp_path / "clean", progress=False)
    # Step 5 runs from the state after step 4 (checkpoint 4) and fails: checkpoint 4 is not known to be good (its
    # step failed), so it is dropped and the rerun resumes from 2, with the data position saved with it.
    with pytest.raises(TrainingDiverged, match=r"loss nan / grad norm nan at step 5; the last good checkpoint is 2 "):
        fit(_small(), _PoisonAt(_batches(epochs=2), 5), config, tmp_path / "cut", progress=False)
    assert sorted(int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    model, resumed = fit(_small(), _batches(epochs=2), config, tmp_path / "cut", progress=False)
    assert [h["loss"] for h in resumed] == [h["loss"] for h in clean[2:]]
    assert [h["grad_norm"] for h in resumed] == [h["grad_norm"] for h in clean[2:]]
    clean_params, params = _params(clean_model), _params(model)
    for key in clean_params:
        np.testing.assert_array_equal(params[key], clean_params[key], err_msg=str(key))
    # metrics.jsonl was cut back to the resumed step: each step once, as in the run that never saw the NaN.
    logged = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, 9))
    assert [m["loss"] for m in logged] == [h["loss"] for h in clean]
    # Retention: keep_last=2 checkpoints at the end, the final one among them.
    assert sorted(int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.isdigit()) == [6, 8]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the 1e39 learning rate, on purpose
def test_after_a_divergence_a_lower_learning_rate_resumes_from_a_good_state(tmp_path):
    # The reported case: lr 1e9 without clipping blows the parameters up (~3e11) in step 1 while its loss is finite;
    # step 2 from that state has NaN gradients. That state was checkpointed and "resumed from" before: every rerun
    # failed again. Now the checkpoint whose step failed is dropped, and the rerun at a sane rate (clipping back on:
    # the optimizer state keeps one structure) trains.
    blow_up = OptimizerConfig(learning_rate=1e9, min_learning_rate=1e9, warmup_ratio=0.0, clip_norm=0.0)
    with pytest.raises(TrainingDiverged, match=r"at step 2; no good checkpoint is left"):
        fit(_small(), _batches(), _cfg(save_every=1, max_steps=8, optimizer=blow_up), tmp_path, progress=False)
    _, history = fit(_small(), _batches(), ROLLBACK, tmp_path, progress=False)
    losses = [h["loss"] for h in history]
    assert len(losses) == 8 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    # An update that overflows the state while its loss and gradients are finite stops at that step, unsaved.
    overflow = OptimizerConfig(learning_rate=1e39, min_learning_rate=1e39, warmup_ratio=0.0)
    with pytest.raises(TrainingDiverged, match=r"the update of step 1 left a non-finite parameter or optimizer state"):
        fit(_small(), _batches(), _cfg(save_every=1, max_steps=2, optimizer=overflow), tmp_path / "o", progress=False)
    assert not any(p.name.isdigit() for p in (tmp_path / "o" / "checkpoints").iterdir())


def test_a_full_disk_while_checkpointing_is_one_clear_error_and_keeps_the_earlier_checkpoints(tmp_path):
    """A real write failure from the kernel: RLIMIT_FSIZE makes any write past the limit fail (EFBIG), like a
    full disk (ENOSPC) does; no Python or JAX code is replaced."""
    import resource
    import signal

    config = ROLLBACK
    with pytest.raises(_Interrupted):
        fit(_small(), _StopAfter(_batches(), 4), config, tmp_path, progress=False)
    biggest = max(p.stat().st_size for p in (tmp_path / "checkpoints").rglob("*") if p.is_file())
    assert biggest > 64 << 10  # the limit below stops any checkpoint data file, not the small metrics.jsonl
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal's default kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, hard))
    try:
        with pytest.raises(EnvironmentProblem, match=r"writing checkpoint 6 in .*checkpoints: a file would exceed the "
                                                     r"file-size limit.*\(checkpoints kept: \[4\]\)"):
            fit(_small(), _batches(), config, tmp_path, progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    # Checkpoint 4 is intact: the rerun resumes from it and finishes.
    _, rest = fit(_small(), _batches(), config, tmp_path, progress=False)
    assert len(rest) == 4 and all(np.isfinite([h["loss"] for h in rest]))


def test_tensorstore_disk_errors_are_read_for_their_errno():
    from motab_jax.train.checkpoints import disk_problem

    # TensorStore's text for a full disk (captured from a save onto a full tmpfs).
    error = ValueError('RESOURCE_EXHAUSTED: Error writing "a/0.0" in OCDBT database at local file "/ck/3.orbax-'
                       'checkpoint-tmp/": Failed to write 58496 bytes to file 4: No space left on device '
                       "[os_error_code='28']")
    assert "no space left on the device" in str(disk_problem(error, "writing checkpoint 3"))
    assert disk_problem(ValueError("shapes do not match"), "writing checkpoint 3") is None


def _reverse_kl(student, teacher, batch) -> float:
    from motab_jax.train.losses import chunked_loss_sum

    args = [jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids")]
    total, weight = chunked_loss_sum(student.logits, student.hidden_states(*args), jnp.asarray(batch["loss_mask"]),
                                     teacher_head=teacher.logits, teacher_hidden=teacher.hidden_states(*args),
                                     loss="reverse_kl", chunk_size=16)
    return float(total / weight)


def test_on_policy_distillation_reduces_reverse_kl(tmp_path):
    # Teacher: the student's own initial weights with a 2x sharper LM head, a distribution the student can
    # reach (random initial weights alone give near-uniform next-token distributions).
    from motab_jax.models.transformer import set_param_values

    teacher, student = _model(seed=2), _model(seed=2)
    set_param_values(teacher, {"lm_head": param_values(teacher)["lm_head"] * 50})
    set_param_values(student, {"lm_head": param_values(student)["lm_head"] * 25})
    prompts = [TOK(f"{a}+{b}")["input_ids"] for a in range(4) for b in range(4)]
    config = RolloutConfig(prompts_per_step=4, samples_per_prompt=2, max_new_tokens=12, temperature=1.0, top_p=1.0,
                           seq_len=32, epochs=8, seed=0)
    held_out = next(iter(RolloutSource(student, prompts, [TOK.eos_token_id], dataclasses.replace(config, seed=99))))
    before = _reverse_kl(student, teacher, held_out)
    source = RolloutSource(student, prompts, [TOK.eos_token_id], config)
    _, history = fit(student, source, _cfg(optimizer=OptimizerConfig(learning_rate=2e-4, warmup_ratio=0.2)),
                     tmp_path, teacher=teacher, step_config=StepConfig(loss="reverse_kl", chunk_size=16),
                     progress=False)
    assert len(history) == source.total_steps == 32
    assert all(h["target_tokens"] > 0 for h in history)
    # On held-out rollouts of the initial student the divergence to the teacher fell by more than a quarter
    # (32 small steps; a fixed batch reaches 0.08 from 0.54, the on-policy batches move with the student).
    after = _reverse_kl(student, teacher, held_out)
    assert after < 0.75 * before, (before, after)
