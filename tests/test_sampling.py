"""The sampler: truncation rules vs NumPy references, greedy vs transformers, sampled distribution,
reproducibility, stop tokens, log-probabilities and input errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import motab_jax
from fixtures.make_golden import GOLDEN_DIR, TOKENIZER_SIZE
from motab_jax.sampling import Sample, make_rule, nucleus_mask


@functools.lru_cache(maxsize=None)
def _model(name: str = "qwen3_untied"):
    return motab_jax.load(GOLDEN_DIR / name, dtype="float32")


def _reference_nucleus(p: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Sorted-cumsum nucleus in float64, plus the tokens whose membership is within float32 rounding."""
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order].astype(np.float64))
    count = int(np.searchsorted(cum, top_p) + 1)  # smallest prefix whose mass reaches top_p
    keep = np.zeros_like(p, bool)
    keep[order[:count]] = True
    ambiguous = np.zeros_like(p, bool)
    ambiguous[order[np.abs(cum - top_p) < 1e-5]] = True  # cutting right after these is a rounding call
    ambiguous[order[np.minimum(np.flatnonzero(np.abs(cum - top_p) < 1e-5) + 1, len(p) - 1)]] = True
    return keep, ambiguous


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("sharpness", [0.5, 2.0, 8.0])
def test_nucleus_mask_matches_sorted_cumsum(top_p, sharpness):
    rng = np.random.default_rng(int(top_p * 1000 + sharpness))
    logits = rng.normal(size=(16, 1000)) * sharpness
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    got = np.asarray(nucleus_mask(jnp.asarray(probs, jnp.float32), top_p))
    for row in range(16):
        want, ambiguous = _reference_nucleus(probs[row], top_p)
        assert not np.any((got[row] != want) & ~ambiguous), row
        assert (got[row] != want).sum() <= 1


def test_top_k_and_temperature_truncation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32)
    out = np.asarray(Sample(temperature=0.5, top_k=7).truncated_logits(jnp.asarray(logits)))
    for row in range(4):
        kept = np.argsort(-logits[row])[:7]
        assert set(np.flatnonzero(out[row] > -1e29)) == set(kept)
        np.testing.assert_allclose(out[row, kept], logits[row, kept] / 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="top_p"):
        Sample(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        make_rule(-1.0)


def _greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by re-running the full causal forward pass each step (no cache)."""
    forward = jax.jit(lambda m, x: m(x))
    ids = list(prompt)
    for _ in range(steps):
        padded = np.zeros((1, 64), np.int32)  # one compiled shape; causal, so the padding is never seen
        padded[0, :len(ids)] = ids
        ids.append(int(np.argmax(np.asarray(forward(model, jnp.asarray(padded)))[0, len(ids) - 1])))
    return ids[len(prompt):]


def test_greedy_generate_equals_uncached_greedy_for_ragged_prompts():
    model, tok = _model()
    prompts = [[5, 17, 99], list(range(40, 60)), [200]]
    out = motab_jax.generate(model, tok, prompts, temperature=0, max_new_tokens=12, stop_tokens=[])
    for prompt, completions in zip(prompts, out):
        assert completions[0].token_ids == _greedy_reference(model, prompt, 12)
        assert completions[0].finish_reason == "length"


def test_greedy_matches_transformers_generate():
    torch = pytest.importorskip("torch")
    import transformers

    folder = GOLDEN_DIR / "llama3_untied"
    model, tok = motab_jax.load(folder, dtype="float32", logits_vocab_size=0)  # HF decodes over all 320 rows
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [[3, 9, 27, 81], [100, 101, 102, 103, 104, 105, 106]]
    ours = motab_jax.generate(model, tok, prompts, temperature=0, max_new_tokens=16, stop_tokens=[])
    for prompt, completions in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.as_tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert completions[0].token_ids == ref


def _chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness of fit, low-expectation categories pooled (regularised gamma tail)."""
    from math import exp, lgamma, log

    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp_ = np.append(expected[big], expected[~big].sum())
    if exp_[-1] < 5:
        obs, exp_ = obs[:-1], exp_[:-1]
    stat = float(((obs - exp_) ** 2 / exp_).sum())
    dof = len(obs) - 1
    # Upper tail of chi2(dof) via the series of the regularised lower incomplete gamma function.
    a, x = dof / 2.0, stat / 2.0
    term = total = 1.0 / a
    for n in range(1, 2000):
        term *= x / (a + n)
        total += term
    lower = total * exp(-x + a * log(x) - lgamma(a))
    return max(0.0, 1.0 - lower)


@pytest.mark.parametrize("temperature,top_p,top_k", [  # the fast set keeps the case with all three knobs
    pytest.param(1.0, 1.0, 0, marks=pytest.mark.slow), pytest.param(0.6, 0.95, 0, marks=pytest.mark.slow),
    (1.3, 0.8, 20)])
def test_sampled_first_token_follows_the_truncated_distribution(temperature, top_p, top_k):
    model, tok = _model()
    prompt = [7, 8, 9, 10]
    n = 3000
    out = motab_jax.generate(model, tok, [prompt], n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                             max_new_tokens=1, stop_tokens=[], batch_size=n, seed=11)
    counts = np.bincount([c.token_ids[0] for c in out[0]], minlength=TOKENIZER_SIZE)
    logits = model(jnp.asarray([prompt], jnp.int32))[0, -1]
    probs = np.asarray(Sample(temperature=temperature, top_k=top_k, top_p=top_p).distribution(logits), np.float64)
    assert counts[probs == 0].sum() == 0  # nothing outside top-k / the nucleus is ever sampled
    assert _chi_square_pvalue(counts, probs / probs.sum()) > 1e-3


def test_reproducible_and_independent_of_batch_size():
    model, tok = _model()
    prompts = [[1, 2, 3], [50, 60, 70, 80, 90]]
    kwargs = dict(n=3, temperature=0.9, top_p=0.9, max_new_tokens=10, stop_tokens=[])
    a = motab_jax.generate(model, tok, prompts, seed=5, batch_size=6, **kwargs)
    b = motab_jax.generate(model, tok, prompts, seed=5, batch_size=4, **kwargs)
    c = motab_jax.generate(model, tok, prompts, seed=6, batch_size=6, **kwargs)
    ids = lambda out: [[x.token_ids for x in per_prompt] for per_prompt in out]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_stop_tokens_logprobs_and_text():
    model, tok = _model()
    prompt = [30, 31, 32]
    free = motab_jax.generate(model, tok, [prompt], temperature=0, max_new_tokens=10, stop_tokens=[])[0][0]
    stop = free.token_ids[4]
    stopped = motab_jax.generate(model, tok, [prompt], temperature=0, max_new_tokens=10, stop_tokens=[stop],
                                 return_logprobs=True)[0][0]
    first = free.token_ids.index(stop)
    assert stopped.token_ids == free.token_ids[:first + 1]
    assert stopped.finish_reason == "stop"
    assert stopped.text == tok.decode(free.token_ids[:first], skip_special_tokens=True)
    full = jax.nn.log_softmax(model(jnp.asarray([prompt + stopped.token_ids], jnp.int32))[0])
    expected = [float(full[len(prompt) - 1 + i, t]) for i, t in enumerate(stopped.token_ids)]
    np.testing.assert_allclose(stopped.logprobs, expected, atol=1e-5)


def test_prompt_forms_and_errors():
    model, tok = _model()
    as_text = motab_jax.generate(model, tok, ["the theme"], temperature=0, max_new_tokens=3)[0][0]
    as_ids = motab_jax.generate(model, tok, [tok("the theme")["input_ids"]], temperature=0, max_new_tokens=3)[0][0]
    assert as_text.token_ids == as_ids.token_ids
    chat = [{"role": "user", "content": "hi"}]
    as_chat = motab_jax.generate(model, tok, [chat], temperature=0, max_new_tokens=3)[0][0]
    as_chat_text = motab_jax.generate(model, tok, ["hi"], temperature=0, max_new_tokens=3, chat_template=True)[0][0]
    assert as_chat.token_ids == as_chat_text.token_ids
    with pytest.raises(ValueError, match="max_position_embeddings"):
        motab_jax.generate(model, tok, [[1] * 500], max_new_tokens=100)
    with pytest.raises(ValueError, match="empty"):
        motab_jax.generate(model, tok, [[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="n=0"):
        motab_jax.generate(model, tok, ["x"], n=0)
