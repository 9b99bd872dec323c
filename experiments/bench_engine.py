"""The paged, continuous-batching engine against what it replaced, on the same work in one run.

    python experiments/bench_engine.py --dense-checkout /tmp/dense     # after: git worktree add /tmp/dense f6a36ce

1. Synthesis at traj_cap 32768 with short live trajectories (MOTAB, tiny random models, a stop set that ends
   trajectories after ~100 tokens): this engine (paged caches, refills of the new slots only) against the
   dense-cache engine of commit f6a36ce, run in a subprocess from a checkout of that commit. Both draw the same
   random keys, so they produce the same records: the same work, token for token (checked).
2. Evaluation-style sampling with uneven lengths (a geometric length distribution capped at max_new_tokens):
   continuous batching (`generate_rows`, a finished row replaced at once) against the static batches of
   `sample_batch` (each batch runs as long as its longest row), same rows, same keys, same outputs (checked).
Timings exclude compilation (a warm-up run first). Ratios are the figures that carry across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_synthesis import PRESETS, build  # noqa: E402
from report import print_table  # noqa: E402

import motab_jax  # noqa: E402
from motab_jax.motab.generation import GenerationConfig, generate_rows  # noqa: E402
from motab_jax.sampling import make_rule, sample_batch  # noqa: E402

# Run in the dense checkout (and here, for the paged engine): load the exported models, synthesize twice
# (warm-up, then timed), print the wall time and a digest of the records.
SYNTHESIS_RUN = r"""
import json, sys, time, hashlib
import motab_jax
folder, cfg, questions = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
student, tok = motab_jax.load(folder + "/student", dtype="float32")
teacher, _ = motab_jax.load(folder + "/teacher", dtype="float32")
tok = motab_jax.text.byte_level_tokenizer()
cfg["extra_stop_tokens"] = tuple(cfg["extra_stop_tokens"])
list(motab_jax.synthesize(student, teacher, tok, questions, cfg, progress=False))  # warm-up: compiles every shape
start = time.perf_counter()
records = sorted(motab_jax.synthesize(student, teacher, tok, questions, cfg, progress=False),
                 key=lambda r: r["id"])
seconds = time.perf_counter() - start
tokens = sum(r["tokens"]["student"] + r["tokens"]["teacher"] for r in records)
digest = hashlib.sha256(json.dumps([r["segments"] for r in records]).encode()).hexdigest()[:16]
print(json.dumps({"seconds": seconds, "tokens": tokens, "digest": digest}))
"""


def stop_set(model, prompts, target_length: int, vocab: int) -> list[int]:
    """Token ids whose sampled frequency adds up to about 1 / target_length (so rows end geometrically)."""
    out = sample_batch(model, prompts, list(range(len(prompts))), rule=make_rule(0.6), max_new_tokens=256,
                       stop_tokens=[], seed=99)
    counts = np.bincount(out.tokens.ravel(), minlength=vocab).astype(float)
    freq = counts / counts.sum()
    chosen, mass = [], 0.0
    for token in np.argsort(freq):  # rarest first, skipping tokens never seen
        if freq[token] == 0 or mass + freq[token] > 1.0 / target_length:
            continue
        chosen.append(int(token))
        mass += freq[token]
    return chosen


def synthesis_rows(args, student, teacher, tokenizer, prompts, stops) -> list[tuple[str, str]]:
    folder = tempfile.mkdtemp(prefix="bench_engine_")
    motab_jax.export_hf(student, tokenizer, f"{folder}/student")
    motab_jax.export_hf(teacher, tokenizer, f"{folder}/teacher")
    cfg = dict(policy="motab", num_slots=args.slots, samples_per_question=1, traj_cap=32768, step_cap=32,
               teacher_min_budget=256, max_prompt_len=64, draft_len=8, temperature=0.6, teacher_temperature=0.6,
               iterations_per_sync=16, delimiter="\x00\x00\x00", extra_stop_tokens=stops, prompt_format="raw",
               instruction="")
    questions = [{"id": f"{i:03d}", "prompt_ids": p} for i, p in enumerate(prompts)]
    results = {}
    for name, root in (("paged", str(Path(__file__).resolve().parents[1])), ("dense", args.dense_checkout)):
        env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", ""))
        run = subprocess.run([sys.executable, "-c", SYNTHESIS_RUN, folder, json.dumps(cfg), json.dumps(questions)],
                             capture_output=True, text=True, env=env, cwd=root, check=True)
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
    paged, dense = results["paged"], results["dense"]
    return [
        (f"synthesis, {len(prompts)} trajectories, {args.slots} slots, traj_cap 32768: dense engine (f6a36ce), s",
         f"{dense['seconds']:.2f}"),
        ("  paged engine, s", f"{paged['seconds']:.2f}"),
        ("  speedup (dense / paged)", f"{dense['seconds'] / paged['seconds']:.1f}x"),
        ("  tokens (paged / dense), records identical",
         f"{paged['tokens']} / {dense['tokens']}, {paged['digest'] == dense['digest']}"),
    ]


def eval_rows(args, student, prompts, stops) -> list[tuple[str, str]]:
    rows = list(range(len(prompts)))
    rule = make_rule(0.6, 0.95)

    def static():
        out = []
        for start in range(0, len(prompts), args.slots):
            batch = sample_batch(student, prompts[start:start + args.slots], rows[start:start + args.slots],
                                 rule=rule, max_new_tokens=args.max_new_tokens, stop_tokens=stops, seed=1,
                                 batch_size=args.slots)
            out += [batch.tokens[r, :int(batch.num_generated[r])].tolist() for r in range(batch.tokens.shape[0])]
        return out[:len(prompts)]

    def continuous():
        done = dict(generate_rows(student, prompts, rows, rule=rule, max_new_tokens=args.max_new_tokens,
                                  stop_tokens=stops, seed=1, config=GenerationConfig(num_slots=args.slots)))
        return [done[r].tokens.tolist() for r in rows]

    timings = {}
    for name, fn in (("static", static), ("continuous", continuous)):
        fn()  # warm-up (compilation)
        start = time.perf_counter()
        outputs = fn()
        timings[name] = (time.perf_counter() - start, outputs)
    lengths = [len(t) for t in timings["static"][1]]
    total = sum(lengths)
    same = timings["static"][1] == timings["continuous"][1]
    return [
        (f"eval sampling, {len(prompts)} rows of {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}), "
         f"{args.slots} slots: static batches, tok/s", f"{total / timings['static'][0]:,.0f}"),
        ("  continuous batching, tok/s", f"{total / timings['continuous'][0]:,.0f}"),
        ("  speedup (static / continuous time)", f"{timings['static'][0] / timings['continuous'][0]:.2f}x"),
        ("  outputs identical", str(same)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense-checkout", help="a checkout of commit f6a36ce (the dense-cache engine); without "
                                                  "it the synthesis comparison is skipped")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--trajectories", type=int, default=4)
    parser.add_argument("--eval-rows", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--mean-length", type=int, default=100)
    args = parser.parse_args()
    student_shape, teacher_shape, vocab, *_ = PRESETS["tiny"]
    tokenizer = motab_jax.text.byte_level_tokenizer()
    student = build(student_shape, vocab, tokenizer, "float32", seed=1)
    teacher = build(teacher_shape, vocab, tokenizer, "float32", seed=2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, int(rng.integers(8, 48))).tolist() for _ in range(max(args.trajectories,
                                                                                          args.eval_rows))]
    stops = stop_set(student, prompts[:16], args.mean_length, student.config.output_vocab_size)
    rows = []
    if args.dense_checkout:
        rows += synthesis_rows(args, student, teacher, tokenizer, prompts[:args.trajectories], stops)
    rows += eval_rows(args, student, prompts[:args.eval_rows], stops)
    print(f"\nbench_engine on {jax.devices()[0].device_kind} ({jax.default_backend()}), tiny float32 models "
          f"(student {student.config.num_params / 1e6:.2f}M, teacher {teacher.config.num_params / 1e6:.2f}M), "
          f"{len(stops)} stop ids\n")
    print_table(rows)


if __name__ == "__main__":
    main()
