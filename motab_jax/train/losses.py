"""Token-level distillation losses and their chunked evaluation through the LM head.

Per-token divergences take float32 logits over the full vocabulary, `fn(student [..., V],
teacher [..., V], **params) -> [...]`, and live in the `LOSSES` registry (`register_loss` /
`get_loss`). Notation: p_S = softmax(student), p_T = softmax(teacher), KL(p || q) = sum p (log p - log q).

    forward_kl       KL(p_T || p_S)
    reverse_kl       KL(p_S || p_T)
    jsd(beta=0.5)    beta KL(p_T || M) + (1 - beta) KL(p_S || M),  M = beta p_T + (1 - beta) p_S   (GKD)
    akl(alpha=0.5)   adaptive KL (Wu et al. 2024), see `adaptive_kl`
    skew_kl(alpha=0.1)          KL(p_T || alpha p_T + (1 - alpha) p_S)                          (DistiLLM)
    skew_reverse_kl(alpha=0.1)  KL(p_S || (1 - alpha) p_T + alpha p_S)                          (DistiLLM)

Parameters (beta, alpha) are static Python numbers in [0, 1]. Values are not clamped at 0: float32
round-off can make a divergence of nearly equal distributions a tiny negative number, and clamping would
zero its gradient.

`chunked_loss_sum` evaluates a loss over [B, T] token positions from hidden states, running the LM
head(s) one sequence chunk at a time inside a rematerialised `lax.scan`, so neither the forward nor the
backward pass ever holds [B, T, V] logits of the student or the teacher.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from motab_jax.sampling.rules import nucleus_mask

Array = jax.Array
Divergence = Callable[..., Array]

LOSSES: dict[str, Divergence] = {}
_LOG_FLOOR = -1e30  # stands in for log(0) where -inf would poison gradients


def register_loss(name: str) -> Callable[[Divergence], Divergence]:
    """Decorator adding `fn(student_logits, teacher_logits, **params) -> [...]` to `LOSSES` as `name`."""

    def decorator(fn: Divergence) -> Divergence:
        if name in LOSSES or name == "ce":
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        return fn

    return decorator


def get_loss(name: str) -> Divergence:
    """The registered divergence called `name`."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; registered divergences: {sorted(LOSSES)} "
                         f"(and 'ce' for chunked_loss_sum)") from None


# ---------------------------------------------------------------------------------------------- helpers
def _unit(name: str, value: float) -> float:
    # float() also rejects traced values: the endpoint branches below need a concrete number.
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} must be in [0, 1]")
    return value


def _log_probs(student_logits: Array, teacher_logits: Array) -> tuple[Array, Array]:
    """float32 log-softmax of both [..., V] (student, teacher), after checking they share a vocabulary."""
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vs != vt:
        # Both models must score the tokenizer's vocabulary; padded embedding rows are cut off by
        # `Decoder.logits` (output_vocab_size), so a mismatch means different tokenizers or configs.
        raise ValueError(f"student logits have vocabulary width {vs} but teacher logits have {vt}; "
                         "distillation needs both over the same tokenizer vocabulary")
    return (jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1),
            jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1))


def _kl(log_p: Array, log_q: Array) -> Array:
    """KL(p || q) over the last axis from log-probabilities [..., V] -> [...].

    Terms with p = 0 count as 0 even where log q = -inf (masked logits); the `where` sits inside the
    product so that neither the value nor the gradient sees the 0 * inf of such terms.
    """
    p = jnp.exp(log_p)
    diff = jnp.where(p > 0, log_p - log_q, 0.0)
    return jnp.sum(p * diff, axis=-1)


def _log_mix(w: float, log_a: Array, log_b: Array) -> Array:
    """log(w a + (1 - w) b) from log a, log b [..., V]; w a static number in [0, 1].

    The endpoints skip logaddexp with a log(0) = -inf argument, whose JVP would send a spurious
    tangent through the vanishing branch. Masked (-inf) log-probabilities are floored at a finite
    value: logaddexp(-inf, -inf) has a NaN gradient.
    """
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    log_a, log_b = jnp.maximum(log_a, _LOG_FLOOR), jnp.maximum(log_b, _LOG_FLOOR)
    return jnp.logaddexp(math.log(w) + log_a, math.log1p(-w) + log_b)


# ------------------------------------------------------------------------------------------- divergences
@register_loss("forward_kl")
def forward_kl(student_logits: Array, teacher_logits: Array) -> Array:
    """KL(p_T || p_S): logits [..., V] -> [...]. Mode-covering."""
    ls, lt = _log_probs(student_logits, teacher_logits)
    return _kl(lt, ls)


@register_loss("reverse_kl")
def reverse_kl(student_logits: Array, teacher_logits: Array) -> Array:
    """KL(p_S || p_T): logits [..., V] -> [...]. Mode-seeking; the on-policy default."""
    ls, lt = _log_probs(student_logits, teacher_logits)
    return _kl(ls, lt)


@register_loss("jsd")
def generalized_jsd(student_logits: Array, teacher_logits: Array, beta: float = 0.5) -> Array:
    """Generalized JSD(beta) of GKD (Agarwal et al. 2024): logits [..., V] -> [...].

    M = beta p_T + (1 - beta) p_S;  JSD = beta KL(p_T || M) + (1 - beta) KL(p_S || M), symmetric at 0.5.
    Taken literally the definition is 0 at beta = 0 and 1 (M equals the distribution given all the
    weight). Instead, as TRL's GKDTrainer does, beta = 0 returns forward KL(p_T || p_S) and beta = 1
    returns reverse KL(p_S || p_T): these are the limits of JSD/beta and JSD/(1 - beta), i.e. the
    divergences JSD(beta) interpolates between, and a constant zero loss would silently train nothing.
    """
    b = _unit("beta", beta)
    ls, lt = _log_probs(student_logits, teacher_logits)
    if b == 0.0:
        return _kl(lt, ls)
    if b == 1.0:
        return _kl(ls, lt)
    log_m = _log_mix(b, lt, ls)
    return b * _kl(lt, log_m) + (1.0 - b) * _kl(ls, log_m)


@register_loss("akl")
def adaptive_kl(student_logits: Array, teacher_logits: Array, alpha: float = 0.5) -> Array:
    """Adaptive KL (Wu et al. 2024): logits [..., V] -> [...].

    Head H = the smallest set of highest-p_T tokens whose mass reaches mu = `alpha` (`nucleus_mask`,
    ties kept); g_head = sum_H |p_T - p_S|, g_tail = sum_{not H} |p_T - p_S|;
    AKL = g_head / (g_head + g_tail) FKL + g_tail / (g_head + g_tail) RKL.
    The mixing weights are constants (stop_gradient), as in the paper's implementation. When
    g_head + g_tail = 0 the distributions coincide, both KLs vanish, and both weights are set to 0.
    """
    mu = _unit("alpha", alpha)
    ls, lt = _log_probs(student_logits, teacher_logits)
    # The weights are constants, so the head search and gaps need no gradient.
    ps, pt = jax.lax.stop_gradient(jnp.exp(ls)), jax.lax.stop_gradient(jnp.exp(lt))
    head = nucleus_mask(pt, mu)
    gap = jnp.abs(pt - ps)
    g_head = jnp.sum(jnp.where(head, gap, 0.0), axis=-1)
    g_tail = jnp.sum(jnp.where(head, 0.0, gap), axis=-1)
    total = g_head + g_tail
    safe = jnp.where(total > 0, total, 1.0)
    return (g_head / safe) * _kl(lt, ls) + (g_tail / safe) * _kl(ls, lt)


@register_loss("skew_kl")
def skew_kl(student_logits: Array, teacher_logits: Array, alpha: float = 0.1) -> Array:
    """Skew forward KL (DistiLLM): KL(p_T || alpha p_T + (1 - alpha) p_S), logits [..., V] -> [...].

    alpha = 0 is forward KL; alpha = 1 is identically 0.
    """
    a = _unit("alpha", alpha)
    ls, lt = _log_probs(student_logits, teacher_logits)
    return _kl(lt, _log_mix(a, lt, ls))


@register_loss("skew_reverse_kl")
def skew_reverse_kl(student_logits: Array, teacher_logits: Array, alpha: float = 0.1) -> Array:
    """Skew reverse KL (DistiLLM): KL(p_S || (1 - alpha) p_T + alpha p_S), logits [..., V] -> [...].

    alpha = 0 is reverse KL; alpha = 1 is identically 0.
    """
    a = _unit("alpha", alpha)
    ls, lt = _log_probs(student_logits, teacher_logits)
    return _kl(ls, _log_mix(a, ls, lt))


def cross_entropy(student_logits: Array, targets: Array) -> Array:
    """SFT token loss -log p_S(target): logits [..., V], int targets [...] -> float32 [...].

    Targets must lie in [0, V); out-of-range ids give NaN (callers mask them with zero weight).
    """
    logits = student_logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    # logsumexp - picked avoids materialising a second [..., V] array of log-probabilities.
    return jax.nn.logsumexp(logits, axis=-1) - picked


# --------------------------------------------------------------------------------------- chunked evaluation
def chunked_loss_sum(head: Callable[[Array], Array], hidden: Array, weights: Array, *,
                     targets: Array | None = None, teacher_head: Callable[[Array], Array] | None = None,
                     teacher_hidden: Array | None = None, loss: str = "ce", chunk_size: int = 512,
                     **params: float) -> tuple[Array, Array]:
    """Weighted token-loss sum through the LM head(s), one sequence chunk at a time.

    Args:
      head: student hidden [..., D] -> float32 logits [..., V] (e.g. `lambda h: model.logits(h)`).
      hidden: student hidden states [B, T, D].
      weights: float32 [B, T]; 0 masks a position (its loss is dropped even if NaN).
      targets: int [B, T], required for loss "ce".
      teacher_head, teacher_hidden: teacher [..., Dt] -> float32 [..., V] and teacher hidden states
        [B, T, Dt], required for divergences. The teacher gets no gradient.
      loss: "ce" or a name in `LOSSES`; params go to that divergence (e.g. beta=0.5 for "jsd").
      chunk_size: sequence positions per chunk; 0 (or less) evaluates everything at once (the
        reference path; it materialises [B, T, V] logits).

    Returns:
      (sum over positions of weight * per-token loss, sum of weights), both float32 scalars. The
      caller normalises by the weight total of the global batch, hence sums rather than a mean.

    T is padded to a multiple of the chunk size with zero weights; `lax.scan` walks the chunks
    [num_chunks, B, C, ...] and each step is a `jax.checkpoint`, so the backward pass recomputes a
    chunk's logits (student and teacher) instead of storing them: peak logits memory is [B, C, V]
    per model, at the price of a second head matmul per chunk.
    """
    if loss == "ce":
        if targets is None:
            raise ValueError("loss 'ce' needs targets [B, T]")
        if teacher_head is not None or teacher_hidden is not None:
            raise ValueError("loss 'ce' takes no teacher_head / teacher_hidden; pick a divergence to distil")
        if params:
            raise ValueError(f"loss 'ce' takes no parameters, got {sorted(params)}")
        other = targets
    else:
        divergence = get_loss(loss)
        if teacher_head is None or teacher_hidden is None:
            raise ValueError(f"loss {loss!r} needs both teacher_head and teacher_hidden")
        if targets is not None:
            raise ValueError(f"loss {loss!r} is a divergence to the teacher and takes no targets")
        other = teacher_hidden
    if hidden.ndim != 3 or weights.shape != hidden.shape[:2]:
        raise ValueError(f"hidden {hidden.shape} must be [B, T, D] and weights {weights.shape} [B, T]")
    if other.shape[:2] != weights.shape:
        which = "targets" if loss == "ce" else "teacher_hidden"
        raise ValueError(f"{which} {other.shape} does not match weights [B, T] = {weights.shape}")

    def block_sum(h: Array, w: Array, o: Array) -> Array:
        """h [B, C, D], w [B, C], o targets [B, C] or teacher hidden [B, C, Dt] -> scalar."""
        student = head(h).astype(jnp.float32)
        if loss == "ce":
            per_token = cross_entropy(student, o)
        else:
            teacher = jax.lax.stop_gradient(teacher_head(jax.lax.stop_gradient(o)).astype(jnp.float32))
            per_token = divergence(student, teacher, **params)
        return jnp.sum(jnp.where(w != 0, w * per_token, 0.0))

    weights = weights.astype(jnp.float32)
    weight_sum = jnp.sum(weights)
    batch, length = weights.shape
    if chunk_size <= 0:
        return block_sum(hidden, weights, other), weight_sum

    size = min(chunk_size, length)
    num_chunks = -(-length // size)
    pad = num_chunks * size - length

    def split(x: Array) -> Array:
        """[B, T, ...] -> [num_chunks, B, C, ...], zero-padded along T."""
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(batch, num_chunks, size, *x.shape[2:]).swapaxes(0, 1)

    # prevent_cse=False is the documented setting for checkpoint inside scan (scan already keeps XLA
    # from merging the recomputation back into the forward pass).
    step_sum = jax.checkpoint(block_sum, prevent_cse=False)

    def step(total: Array, xs: tuple[Array, Array, Array]) -> tuple[Array, None]:
        return total + step_sum(*xs), None

    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (split(hidden), split(weights), split(other)))
    return total, weight_sum
