"""MOTAB against the paper's baselines and ablations for one teacher/student pair: synthesis + SFT + eval
for each policy, and one comparison table.

    python experiments/compare_policies.py                                   # the CPU demo pair
    python experiments/compare_policies.py --config=configs/limo.py          # a real pair on accelerators
    python experiments/compare_policies.py --config.policies=motab,skd_step@gamma=0.8

It is `run.py` with every policy enabled (MOTAB, teacher-only, student-only, SKD step-level with gamma swept
over 0.6-1.0, SKD token-level, and the three MOTAB ablations) plus a table that puts each policy's synthesis
statistics beside the accuracy of the student trained on its data. Reruns resume like `run.py`.
"""

from __future__ import annotations

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from motab_jax.pipeline import run_pipeline  # noqa: E402

# MOTAB, the SKD step-level gamma sweep of the paper, SKD token-level, teacher-only, student-only, the ablations.
ALL_POLICIES = ",".join(["motab"] + [f"skd_step@gamma={g}" for g in ("0.6", "0.7", "0.8", "0.9", "1.0")]
                        + ["skd_token", "teacher_only", "student_only", "motab_no_adaptive", "motab_no_backtrack",
                           "motab_no_stitch"])
DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", default=DEMO, lock_config=False)


def _percent(score) -> str:
    """avg@k in percent; the eval stage records {"avg@k": ..., length fields} per benchmark (a number in runs
    recorded before the length fields existed)."""
    value = score.get("avg@k") if isinstance(score, dict) else score
    return "-" if value is None else f"{100 * value:.1f}"


def comparison_table(summaries: dict) -> str:
    """One row per model: the untrained student, the teacher, then each policy's synthesis statistics beside the
    accuracy of the student fine-tuned on that policy's data."""
    synthesis = {k: v for k, v in summaries.get("synthesize", {}).items() if isinstance(v, dict)}
    evaluation = {k: v for k, v in summaries["eval"].items() if isinstance(v, dict)}
    benchmarks = list(dict.fromkeys(b for scores in evaluation.values() for b in scores))
    lines = ["| model | breach rate | root depth | student / revise / teacher tokens | "
             + " | ".join(f"{os.path.splitext(os.path.basename(b))[0]} avg@k (%)" for b in benchmarks) + " |",
             "| --- | ---: | ---: | ---: |" + " ---: |" * len(benchmarks)]
    for model, scores in evaluation.items():
        policy = model.removeprefix("student after ").removesuffix(" SFT")
        stats = synthesis.get(policy, {})
        depth, rate, tokens = stats.get("mean_root_cause_depth"), stats.get("breach_rate"), stats.get("tokens")
        lines.append(f"| {model} | {'-' if rate is None else f'{rate:.2f}'} | "
                     f"{'-' if depth is None else f'{depth:.2f}'} | "
                     f"{'-' if not tokens else '{student:,} / {revise:,} / {teacher:,}'.format(**tokens)} | "
                     + " | ".join(_percent(scores.get(b)) for b in benchmarks) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("motab_jax").setLevel(logging.INFO)
    config = _CONFIG.value
    if config.policies in ("", "motab,teacher_only"):  # not narrowed on the command line
        config.policies = ALL_POLICIES
    config.run_dir = config.run_dir + "_compare" if not config.run_dir.endswith("_compare") else config.run_dir
    summaries = run_pipeline(config)
    table = comparison_table(summaries)
    with open(os.path.join(config.run_dir, "comparison.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(config.run_dir, "comparison.json"), "w") as f:
        json.dump(summaries, f, indent=2)
    print("\n" + table)


if __name__ == "__main__":
    app.run(main)
