"""Synthesis engine benchmark: sampler, monitored exploration, speculative teacher continuation, MOTAB.

    python experiments/bench_synthesis.py                      # tiny models on CPU (a couple of minutes)
    python experiments/bench_synthesis.py --preset gpu         # 1.5B-shaped student, 7B-shaped teacher

Random weights; step ends are forced by `step_cap` and breaches by a benchmark policy that rejects a
set fraction of steps (a strategy object plugged into the unchanged loop), so the numbers are controlled.
All timings exclude compilation (each configuration runs once to warm up). Every figure in one run comes
from the same machine, so the ratios are comparable; on a GPU the sampler is also reported as a fraction
of the memory-bandwidth floor (weights + KV cache read per decode step over measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from report import copy_bandwidth, print_table  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import motab_jax  # noqa: E402
from motab_jax.models import ModelConfig, init_random  # noqa: E402
from motab_jax.motab import Motab  # noqa: E402
from motab_jax.sampling import make_rule, sample_batch  # noqa: E402

PRESETS = {
    # name: (student shape, teacher shape, vocab rows, batch, prompt tokens, new tokens)
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
             dict(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32),
             384, 8, 32, 64),
    "gpu": (dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128),
            dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128),
            151936, 64, 128, 256),
}


@dataclasses.dataclass(frozen=True)
class ForcedBreach(Motab):
    """MOTAB whose judge rejects about `rate` of the steps (pseudo-randomly, from V's low digits)."""

    name: str = "motab_forced"
    rate: float = 0.3

    def judge(self, v_teacher, v_student, eps):
        return jnp.mod(v_teacher * 1e4, 1.0) >= self.rate


def build(shape: dict, vocab: int, tokenizer, dtype: str, seed: int):
    """Random weights, with the LM head scaled so logits have a standard deviation of about 3: a plain
    0.02-std init gives a near-uniform next-token distribution, unlike any trained model."""
    from motab_jax.models.transformer import param_values, set_param_values

    cfg = ModelConfig(model_type="qwen2", vocab_size=vocab, qkv_bias=True, param_dtype=dtype, compute_dtype=dtype,
                      logits_vocab_size=len(tokenizer) if len(tokenizer) < vocab else 0,
                      max_position_embeddings=1 << 16, **shape)
    model = init_random(cfg, seed=seed)
    head = param_values(model)["lm_head"]
    set_param_values(model, {"lm_head": head * (3.0 / (0.02 * cfg.hidden_size ** 0.5))})
    return model


def layer_prefix(model, num_layers: int):
    """A shallower model made of `model`'s first layers (embeddings, final norm and head shared)."""
    from motab_jax.models.transformer import abstract_decoder, param_values, set_param_values

    small = abstract_decoder(dataclasses.replace(model.config, num_layers=num_layers))
    values = {name: value[:num_layers] if name.startswith("layers.") else value
              for name, value in param_values(model).items()}
    set_param_values(small, values)
    return small


def damp_late_layers(model, first: int, scale: float) -> None:
    """Scale the residual contributions (o_proj, down_proj) of layers >= `first`."""
    from motab_jax.models.transformer import param_values, set_param_values

    values = param_values(model)
    factor = jnp.where(jnp.arange(model.config.num_layers) >= first, scale, 1.0).astype(values["layers.wo"].dtype)
    set_param_values(model, {name: values[name] * factor.reshape((-1,) + (1,) * (values[name].ndim - 1))
                             for name in ("layers.wo", "layers.w_down")})


def timed(fn, repeats: int = 3):
    fn()  # warm-up (compile)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - start) / repeats, out


def decode_floor_seconds(model, batch: int, prompt: int, new: int, bandwidth: float) -> float:
    """Sum over decode steps of (all weight bytes + KV cache bytes read) / bandwidth."""
    c = model.config
    weight_bytes = c.num_params * jnp.dtype(c.param_dtype).itemsize
    kv_per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * jnp.dtype(c.compute_dtype).itemsize
    total = sum(weight_bytes + batch * kv_per_token * (prompt + i) for i in range(new))
    return total / bandwidth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--draft-len", type=int, default=8)
    parser.add_argument("--breach-rate", type=float, default=0.3)
    parser.add_argument("--draft-temperature", type=float, default=0.6,
                        help="student draft temperature in teacher mode (0: greedy drafts, no [B, k, V] buffer)")
    parser.add_argument("--draft", choices=["random", "teacher-prefix"], default="teacher-prefix",
                        help="student weights: independent random, or the teacher's first layers (same width, "
                             "shared embeddings) so drafts are often accepted, as with a distilled student")
    parser.add_argument("--late-layer-scale", type=float, default=0.05,
                        help="with --draft teacher-prefix: scale of the teacher's output projections in the layers "
                             "the student lacks; smaller means the student agrees more (controls acceptance)")
    args = parser.parse_args()
    student_shape, teacher_shape, vocab, batch, prompt_len, new = PRESETS[args.preset]
    batch, new = args.batch or batch, args.new_tokens or new
    if args.preset == "tiny":
        tokenizer, dtype = motab_jax.text.byte_level_tokenizer(), "float32"
    else:
        tokenizer, dtype = motab_jax.text.qwen_tokenizer("qwen2"), "bfloat16"
    teacher = build(teacher_shape, vocab, tokenizer, dtype, seed=2)
    if args.draft == "random":
        student = build(student_shape, vocab, tokenizer, dtype, seed=1)
    else:
        damp_late_layers(teacher, student_shape["num_layers"], args.late_layer_scale)
        student = layer_prefix(teacher, student_shape["num_layers"])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(300 if vocab > 1000 else 0, 256, prompt_len).tolist() for _ in range(batch)]
    rule = make_rule(0.6, 1.0)
    rows: list[tuple[str, str]] = []

    def sampler(model):
        return lambda: sample_batch(model, prompts, list(range(batch)), rule=rule, max_new_tokens=new,
                                    stop_tokens=[], seed=0)

    t_student, _ = timed(sampler(student))
    t_teacher, _ = timed(sampler(teacher))
    rows += [("student sampling (sampler), tok/s", f"{batch * new / t_student:,.0f}"),
             ("teacher sampling (sampler, no drafts), tok/s", f"{batch * new / t_teacher:,.0f}")]

    questions = [{"id": str(i), "prompt_ids": p} for i, p in enumerate(prompts)]
    base = dict(num_slots=batch, samples_per_question=1, traj_cap=new, step_cap=16, teacher_min_budget=new,
                max_prompt_len=prompt_len, draft_len=args.draft_len, temperature=0.6, teacher_temperature=0.6,
                draft_temperature=args.draft_temperature,
                iterations_per_sync=1 << 20, delimiter="\x00\x00\x00")

    def engine(policy):
        cfg = dict(base, policy=policy)
        return lambda: list(motab_jax.synthesize(student, teacher, tokenizer, questions, cfg, progress=False))

    def tokens(records, source=None):
        return sum(r["tokens"]["student"] + r["tokens"]["teacher"] if source is None else r["tokens"][source]
                   for r in records)

    t_so, rec_so = timed(engine("student_only"))
    t_explore, rec_explore = timed(engine(ForcedBreach(rate=0.0)))
    t_to, rec_to = timed(engine("teacher_only"))
    t_mix, rec_mix = timed(engine(ForcedBreach(rate=args.breach_rate)))
    drafted = sum(r["speculative"]["drafted"] for r in rec_to)
    accepted = sum(r["speculative"]["accepted"] for r in rec_to)
    forwards = sum(r["teacher_forwards"] for r in rec_mix)
    steps = sum(len(r["steps"]) for r in rec_mix)
    rows += [
        ("engine student-only, tok/s", f"{tokens(rec_so) / t_so:,.0f}"),
        ("MOTAB monitored exploration (no breach), tok/s", f"{tokens(rec_explore) / t_explore:,.0f}"),
        ("  time vs student-only for the same tokens (target <= 1.6x)",
         f"{(t_explore / tokens(rec_explore)) / (t_student / (batch * new)):.2f}x"),
        ("teacher-only, speculative (student drafts), tok/s", f"{tokens(rec_to) / t_to:,.0f}"),
        ("  speedup over plain teacher sampling", f"{(tokens(rec_to) / t_to) / (batch * new / t_teacher):.2f}x"),
        ("  draft acceptance rate", f"{accepted / max(drafted, 1):.3f}"),
        (f"MOTAB with {args.breach_rate:.0%} forced step rejections, tok/s", f"{tokens(rec_mix) / t_mix:,.0f}"),
        ("  breach rate per trajectory", f"{np.mean([r['breach_step'] is not None for r in rec_mix]):.2f}"),
        ("  breach rate per judged step", f"{sum(r['breach_step'] is not None for r in rec_mix) / max(steps, 1):.3f}"),
        ("  tokens by provenance (student / teacher)",
         f"{tokens(rec_mix, 'student')} / {tokens(rec_mix, 'teacher')}"),
        ("  teacher forwards per kept token", f"{forwards / max(tokens(rec_mix), 1):.3f}"),
    ]
    if jax.default_backend() == "gpu":
        bandwidth = copy_bandwidth()
        floor = decode_floor_seconds(student, batch, prompt_len, new, bandwidth)
        rows += [("copy bandwidth, GB/s", f"{bandwidth / 1e9:,.0f}"),
                 ("student sampling, fraction of the bandwidth floor (target >= 0.70)", f"{floor / t_student:.2f}"),
                 ("teacher sampling, fraction of the bandwidth floor",
                  f"{decode_floor_seconds(teacher, batch, prompt_len, new, bandwidth) / t_teacher:.2f}")]
    device = jax.devices()[0].device_kind
    print(f"\n{args.preset} preset on {device} ({jax.default_backend()}), batch {batch}, prompt {prompt_len}, "
          f"{new} new tokens, k = {args.draft_len}, {dtype}; student: {args.draft}"
          f"{f' (late-layer scale {args.late_layer_scale})' if args.draft != 'random' else ''} "
          f"({student.config.num_params / 1e6:.2f}M params), teacher {teacher.config.num_params / 1e6:.2f}M\n")
    print_table(rows)


if __name__ == "__main__":
    main()
