"""Distillation losses: float64 NumPy references, properties, and chunked == unchunked on a real model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from motab_jax.models.config import ModelConfig
from motab_jax.models.loading import init_random
from motab_jax.models.transformer import param_values, set_param_values
from motab_jax.train import losses
from motab_jax.train.losses import LOSSES, chunked_loss_sum, cross_entropy, get_loss, register_loss

VOCAB = 96


# ------------------------------------------------------------------------------- float64 NumPy references
def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def _np_akl_weights(pt: np.ndarray, ps: np.ndarray, mu: float) -> tuple[np.ndarray, np.ndarray]:
    """(head weight, tail weight), head found by sorting p_T and taking the prefix reaching mass mu."""
    order = np.argsort(-pt, axis=-1)
    cum = np.cumsum(np.take_along_axis(pt, order, -1), -1)
    count = (cum < mu).sum(-1, keepdims=True) + 1  # first index whose cumulative mass reaches mu, inclusive
    head_sorted = np.arange(pt.shape[-1]) < count
    head = np.zeros_like(head_sorted)
    np.put_along_axis(head, order, head_sorted, -1)
    gap = np.abs(pt - ps)
    g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
    return g_head / (g_head + g_tail), g_tail / (g_head + g_tail)


def np_reference(name: str, s: np.ndarray, t: np.ndarray, **params: float) -> np.ndarray:
    ps, pt = np.exp(_np_log_softmax(s)), np.exp(_np_log_softmax(t))
    if name == "forward_kl":
        return _np_kl(pt, ps)
    if name == "reverse_kl":
        return _np_kl(ps, pt)
    if name == "jsd":
        b = params.get("beta", 0.5)
        m = b * pt + (1 - b) * ps
        return b * _np_kl(pt, m) + (1 - b) * _np_kl(ps, m)
    if name == "akl":
        w_head, w_tail = _np_akl_weights(pt, ps, params.get("alpha", 0.5))
        return w_head * _np_kl(pt, ps) + w_tail * _np_kl(ps, pt)
    if name == "skew_kl":
        a = params.get("alpha", 0.1)
        return _np_kl(pt, a * pt + (1 - a) * ps)
    if name == "skew_reverse_kl":
        a = params.get("alpha", 0.1)
        return _np_kl(ps, (1 - a) * pt + a * ps)
    raise KeyError(name)


CASES = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {}), ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.9}),
         ("akl", {}), ("akl", {"alpha": 0.8}), ("skew_kl", {}), ("skew_kl", {"alpha": 0.5}),
         ("skew_reverse_kl", {}), ("skew_reverse_kl", {"alpha": 0.3})]


def _logits(scale: float, seed: int = 0, close: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Student and teacher logits [3, 5, V] (float32) of a given sharpness; `close` correlates them."""
    rng = np.random.default_rng(seed)
    s = scale * rng.standard_normal((3, 5, VOCAB))
    t = s + 0.3 * scale * rng.standard_normal(s.shape) if close else scale * rng.standard_normal(s.shape)
    return s.astype(np.float32), t.astype(np.float32)


# -------------------------------------------------------------------------------------- per-token values
def test_registry() -> None:
    assert set(LOSSES) == {"forward_kl", "reverse_kl", "jsd", "akl", "skew_kl", "skew_reverse_kl"}
    assert get_loss("jsd") is losses.generalized_jsd
    with pytest.raises(ValueError, match="reverse_kl"):
        get_loss("kl")
    with pytest.raises(ValueError, match="already registered"):
        register_loss("akl")(lambda s, t: s)


@pytest.mark.parametrize("close", [False, True])
@pytest.mark.parametrize("scale", [0.3, 2.0, 8.0])
def test_divergences_match_numpy(scale: float, close: bool) -> None:
    s, t = _logits(scale, seed=int(scale * 10), close=close)
    for name, params in CASES:
        got = np.asarray(get_loss(name)(jnp.asarray(s), jnp.asarray(t), **params))
        want = np_reference(name, s, t, **params)
        assert got.shape == s.shape[:-1]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{name} {params}")
        assert (got >= -1e-6).all(), (name, params)


@pytest.mark.parametrize("scale", [0.3, 8.0])
def test_divergences_vanish_on_equal_inputs(scale: float) -> None:
    s, _ = _logits(scale)
    for name, params in CASES:
        got = np.asarray(get_loss(name)(jnp.asarray(s), jnp.asarray(s), **params))
        np.testing.assert_allclose(got, 0.0, atol=1e-5, err_msg=f"{name} {params}")


def test_special_parameter_values() -> None:
    s, t = (jnp.asarray(x) for x in _logits(1.0))
    fkl, rkl = losses.forward_kl(s, t), losses.reverse_kl(s, t)
    close = dict(rtol=1e-6, atol=1e-7)
    # JSD(0.5) is symmetric; the endpoints follow the GKD/TRL convention (forward / reverse KL).
    np.testing.assert_allclose(losses.generalized_jsd(s, t), losses.generalized_jsd(t, s), **close)
    np.testing.assert_allclose(losses.generalized_jsd(s, t, beta=0.0), fkl, **close)
    np.testing.assert_allclose(losses.generalized_jsd(s, t, beta=1.0), rkl, **close)
    # ... which are the limits of JSD(beta) / beta and JSD(beta) / (1 - beta).
    eps = 1e-3
    np.testing.assert_allclose(losses.generalized_jsd(s, t, beta=eps) / eps, fkl, rtol=2e-2)
    np.testing.assert_allclose(losses.generalized_jsd(s, t, beta=1 - eps) / eps, rkl, rtol=2e-2)
    np.testing.assert_allclose(losses.skew_kl(s, t, alpha=0.0), fkl, **close)
    np.testing.assert_allclose(losses.skew_reverse_kl(s, t, alpha=0.0), rkl, **close)
    np.testing.assert_allclose(losses.skew_kl(s, t, alpha=1.0), 0.0, atol=1e-7)
    np.testing.assert_allclose(losses.skew_reverse_kl(s, t, alpha=1.0), 0.0, atol=1e-7)
    # Gradients at the endpoints are the KL gradients (no spurious tangent through log(0) branches).
    for fn, ref in ((lambda x: losses.skew_reverse_kl(x, t, alpha=0.0), lambda x: losses.reverse_kl(x, t)),
                    (lambda x: losses.skew_kl(x, t, alpha=0.0), lambda x: losses.forward_kl(x, t))):
        np.testing.assert_allclose(jax.grad(lambda x: fn(x).sum())(s), jax.grad(lambda x: ref(x).sum())(s),
                                   rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="beta"):
        losses.generalized_jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        losses.adaptive_kl(s, t, alpha=-0.1)


def test_akl_weights_are_constants() -> None:
    s, t = _logits(2.0, seed=3)
    ps, pt = np.exp(_np_log_softmax(s)), np.exp(_np_log_softmax(t))
    w_head, w_tail = (jnp.asarray(w, jnp.float32) for w in _np_akl_weights(pt, ps, 0.5))
    s, t = jnp.asarray(s), jnp.asarray(t)
    got = jax.grad(lambda x: losses.adaptive_kl(x, t).sum())(s)
    want = jax.grad(lambda x: (w_head * losses.forward_kl(x, t) + w_tail * losses.reverse_kl(x, t)).sum())(s)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_masked_logits_are_finite() -> None:
    # -inf logits (e.g. a truncated vocabulary) give finite values and gradients.
    s, t = (jnp.asarray(x) for x in _logits(1.0))
    s = s.at[..., :10].set(-jnp.inf)
    t = t.at[..., :10].set(-jnp.inf)
    for name, params in CASES:
        value, grad = jax.value_and_grad(lambda x: get_loss(name)(x, t, **params).sum())(s)
        assert np.isfinite(value) and np.isfinite(np.asarray(grad)).all(), (name, params)


def test_cross_entropy_matches_numpy() -> None:
    s, _ = _logits(4.0)
    targets = np.random.default_rng(1).integers(0, VOCAB, s.shape[:-1])
    got = cross_entropy(jnp.asarray(s), jnp.asarray(targets))
    want = -np.take_along_axis(_np_log_softmax(s), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_width_mismatch() -> None:
    s, t = _logits(1.0)
    with pytest.raises(ValueError, match="96.*95"):
        losses.reverse_kl(jnp.asarray(s), jnp.asarray(t[..., :95]))


# ------------------------------------------------------------------------------ chunked, on a real model
@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig("qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True)
    student, teacher = init_random(cfg, seed=0), init_random(cfg, seed=1)
    for model in (student, teacher):  # random init is near-uniform; peak the distributions
        set_param_values(model, {"lm_head": param_values(model)["lm_head"] * 15.0})
    batch, length = 2, 13  # 13 is not a multiple of the chunk sizes below
    tokens = jax.random.randint(jax.random.key(0), (batch, length), 0, VOCAB)
    targets = jnp.roll(tokens, -1, axis=1)
    weights = (jnp.arange(length)[None] < jnp.array([[length], [9]])).astype(jnp.float32)
    weights = weights.at[0, :3].set(0.0).at[1, 5].set(0.5)
    return dict(student=student, teacher=teacher, tokens=tokens, targets=targets, weights=weights,
                hidden=student.hidden_states(tokens), teacher_hidden=teacher.hidden_states(tokens))


def _loss_kwargs(setup: dict, name: str, params: dict, teacher: nnx.Module, teacher_hidden: jax.Array) -> dict:
    if name == "ce":
        return dict(targets=setup["targets"], loss="ce")
    return dict(teacher_head=lambda h: teacher.logits(h), teacher_hidden=teacher_hidden, loss=name, **params)


@pytest.mark.parametrize("name,params", [("ce", {})] + CASES[:3] + CASES[5:6] + CASES[7:8] + CASES[9:10])
def test_chunked_matches_unchunked(setup: dict, name: str, params: dict) -> None:
    def total(student, teacher, hidden, teacher_hidden, chunk_size):
        kwargs = _loss_kwargs(setup, name, params, teacher, teacher_hidden)
        value, weight_sum = chunked_loss_sum(lambda h: student.logits(h), hidden, setup["weights"],
                                             chunk_size=chunk_size, **kwargs)
        return value, weight_sum

    args = (setup["student"], setup["teacher"], setup["hidden"], setup["teacher_hidden"])
    grad_fn = nnx.value_and_grad(total, argnums=(0, 1, 2, 3), has_aux=True)
    (ref, ref_w), ref_grads = grad_fn(*args, 0)
    (got, got_w), got_grads = grad_fn(*args, 4)

    np.testing.assert_allclose(got_w, float(setup["weights"].sum()))
    np.testing.assert_allclose(ref_w, got_w)
    # Per-token reference straight from full logits, weights applied outside.
    student_logits = setup["student"].logits(setup["hidden"])
    if name == "ce":
        per_token = cross_entropy(student_logits, setup["targets"])
    else:
        per_token = get_loss(name)(student_logits, setup["teacher"].logits(setup["teacher_hidden"]), **params)
    np.testing.assert_allclose(ref, float((setup["weights"] * per_token).sum()), rtol=1e-5)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert float(ref) > 1.0  # peaked distributions: the comparison is not between near-zeros

    s_ref, t_ref, h_ref, th_ref = ref_grads
    s_got, t_got, h_got, th_got = got_grads
    for a, b in zip(jax.tree.leaves(s_got) + [h_got], jax.tree.leaves(s_ref) + [h_ref]):
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale + 1e-12)
    assert float(np.abs(np.asarray(h_ref)).max()) > 0
    # The teacher gets no gradient, on either path.
    for g in jax.tree.leaves(t_ref) + jax.tree.leaves(t_got) + [th_ref, th_got]:
        assert not np.asarray(g).any()


@pytest.mark.parametrize("name", ["ce", "reverse_kl"])
def test_chunked_full_model_under_jit(setup: dict, name: str) -> None:
    """Gradients w.r.t. every student parameter, traced through the decoder, inside nnx.jit."""
    teacher, tokens = setup["teacher"], setup["tokens"]

    @nnx.jit(static_argnums=1)
    def step(student, chunk_size):
        def loss_fn(model):
            kwargs = _loss_kwargs(setup, name, {}, teacher, setup["teacher_hidden"])
            value, weight_sum = chunked_loss_sum(lambda h: model.logits(h), model.hidden_states(tokens),
                                                 setup["weights"], chunk_size=chunk_size, **kwargs)
            return value / weight_sum

        return nnx.value_and_grad(loss_fn)(student)

    ref, ref_grads = step(setup["student"], 0)
    got, got_grads = step(setup["student"], 5)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale + 1e-12)


@pytest.mark.parametrize("chunk_size", [1, 13, 64])  # one position, exactly T, larger than T
def test_chunk_sizes(setup: dict, chunk_size: int) -> None:
    teacher = setup["teacher"]

    def total(hidden, chunk):
        return chunked_loss_sum(lambda h: setup["student"].logits(h), hidden, setup["weights"],
                                teacher_head=lambda h: teacher.logits(h), teacher_hidden=setup["teacher_hidden"],
                                loss="jsd", beta=0.3, chunk_size=chunk)[0]

    ref, ref_grad = jax.value_and_grad(total)(setup["hidden"], 0)
    got, got_grad = jax.value_and_grad(total)(setup["hidden"], chunk_size)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(got_grad, ref_grad, rtol=1e-4, atol=1e-5 * float(np.abs(ref_grad).max()))


def test_chunked_backward_does_not_hold_full_logits() -> None:
    batch, length, dim, vocab = 2, 256, 16, 4096
    keys = jax.random.split(jax.random.key(0), 3)
    w_student = jax.random.normal(keys[0], (dim, vocab))
    w_teacher = jax.random.normal(keys[1], (dim, vocab))
    hidden = jax.random.normal(keys[2], (batch, length, dim))
    weights = jnp.ones((batch, length))

    def temp_bytes(chunk_size: int) -> int:
        def f(w, h):
            return chunked_loss_sum(lambda x: x @ w, h, weights, teacher_head=lambda x: x @ w_teacher,
                                    teacher_hidden=h, loss="forward_kl", chunk_size=chunk_size)[0]

        compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(w_student, hidden).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("backend gives no memory analysis")
        return analysis.temp_size_in_bytes

    full_logits = batch * length * vocab * 4
    assert temp_bytes(0) >= full_logits
    assert temp_bytes(16) < full_logits // 2


def test_argument_errors(setup: dict) -> None:
    head = lambda h: setup["student"].logits(h)  # noqa: E731
    hidden, weights, targets = setup["hidden"], setup["weights"], setup["targets"]
    teacher = dict(teacher_head=lambda h: setup["teacher"].logits(h), teacher_hidden=setup["teacher_hidden"])
    with pytest.raises(ValueError, match="needs targets"):
        chunked_loss_sum(head, hidden, weights)
    with pytest.raises(ValueError, match="no teacher"):
        chunked_loss_sum(head, hidden, weights, targets=targets, **teacher)
    with pytest.raises(ValueError, match="needs both teacher"):
        chunked_loss_sum(head, hidden, weights, loss="reverse_kl")
    with pytest.raises(ValueError, match="takes no targets"):
        chunked_loss_sum(head, hidden, weights, targets=targets, loss="jsd", **teacher)
    with pytest.raises(ValueError, match="forward_kl"):
        chunked_loss_sum(head, hidden, weights, loss="kl", **teacher)
    with pytest.raises(ValueError, match="does not match"):
        chunked_loss_sum(head, hidden, weights, targets=targets[:, :5])
    narrow = dict(teacher, teacher_head=lambda h: setup["teacher"].logits(h)[..., :90])
    with pytest.raises(ValueError, match="96.*90"):
        chunked_loss_sum(head, hidden, weights, loss="reverse_kl", chunk_size=4, **narrow)


def test_masked_positions_cannot_poison_the_sum(setup: dict) -> None:
    # Padding often carries junk targets; an out-of-range id gives a NaN loss that weight 0 must drop.
    weights, targets = setup["weights"], setup["targets"]
    junk = jnp.where(weights == 0, VOCAB + 7, targets)

    def total(hidden, t):
        return chunked_loss_sum(lambda h: setup["student"].logits(h), hidden, weights, targets=t, chunk_size=4)[0]

    clean, clean_grad = jax.value_and_grad(total)(setup["hidden"], targets)
    value, grad = jax.value_and_grad(total)(setup["hidden"], junk)
    np.testing.assert_allclose(value, clean, rtol=1e-6)
    np.testing.assert_allclose(grad, clean_grad, rtol=1e-6, atol=1e-9)
