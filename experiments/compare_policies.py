"""MOTAB against the paper's baselines and ablations for one teacher/student pair, over several seeds, with
standard errors and a paired comparison on the same held-out problems.

    python experiments/compare_policies.py                                    # the CPU demo pair, every policy
    python experiments/compare_policies.py --seeds=2 --config.policies=motab,teacher_only,student_only
    python experiments/compare_policies.py --config=configs/limo.py           # a real pair on accelerators

What it runs, under `<run_dir>_compare/`:
- `base/`: the stages that make the models (the demo's `pretrain`) and the evaluation of the teacher and the
  student before any SFT, once (greedy or sampled, their outputs depend only on the model and the eval settings);
- `seed<r>/` for r = 0..seeds-1: synthesis, SFT and evaluation of every policy with synthesis.seed + r and sft.seed
  + r (one replicate = a new synthesis sample and a new SFT data order), the models of `base/`, and base's
  evaluations of the teacher and the initial student copied in (not recomputed). KD is not part of the comparison.
Reruns resume like `run.py`. Policies: `--config.policies` narrows the list (default: MOTAB, teacher-only,
student-only, SKD step-level with gamma 0.6-1.0, SKD token-level, the three MOTAB ablations).

What it reports (`comparison.md`, `comparison.json`, printed):
- per policy: held-out accuracy as the mean over seeds, its standard error over seeds and over problems, and the
  synthesis statistics of its records (breach rate, breach step t, t* < t, and, when the questions carry reference
  solutions as the demo's do, where the student's first wrong step was relative to t and t*);
- per baseline: the paired difference `reference - baseline` of per-problem correctness on the same held-out
  problems, averaged over seeds, with two standard errors (`paired_difference`).
What it does not support: a claim beyond this pair, this question distribution and these budgets; and with few seeds
the seed standard error is itself rough (2 seeds: one degree of freedom).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from motab_jax.jsonl import read_jsonl  # noqa: E402
from motab_jax.pipeline import run_pipeline  # noqa: E402
from motab_jax.pipeline.demo_data import first_wrong_step  # noqa: E402
from motab_jax.pipeline.policy_runs import policy_runs  # noqa: E402

# MOTAB, the SKD step-level gamma sweep of the paper, SKD token-level, teacher-only, student-only, the ablations.
ALL_POLICIES = ",".join(["motab"] + [f"skd_step@gamma={g}" for g in ("0.6", "0.7", "0.8", "0.9", "1.0")]
                        + ["skd_token", "teacher_only", "student_only", "motab_no_adaptive", "motab_no_backtrack",
                           "motab_no_stitch"])
DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", default=DEMO, lock_config=False)
_SEEDS = flags.DEFINE_integer("seeds", 3, "replicates: replicate r runs with synthesis.seed + r and sft.seed + r")
_REFERENCE = flags.DEFINE_string("reference", "motab", "the policy (an entry of policies) compared with each other one")
MODEL_STAGES = ("models", "pretrain")  # made once, in base/
REPLICATE_STAGES = ("synthesize", "sft", "eval")
BEFORE, TEACHER = "student (before)", "teacher"


# ------------------------------------------------------------------------------------------------ statistics
def _stderr(values: np.ndarray) -> float | None:
    """Standard error of the mean of `values` (sample standard deviation, ddof 1); None for fewer than 2."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) >= 2 else None


def accuracy_statistics(correct: np.ndarray) -> dict[str, Any]:
    """`correct[r, i]`: the correctness (avg@k) of held-out problem i in replicate r. The mean accuracy; its
    standard error over seeds (from the R per-seed accuracies) and over problems (from the N per-problem means over
    seeds: the uncertainty from which problems were drawn)."""
    correct = np.asarray(correct, dtype=np.float64)
    per_seed = correct.mean(axis=1)
    return {"mean": float(correct.mean()), "se_seeds": _stderr(per_seed), "se_problems": _stderr(correct.mean(axis=0)),
            "per_seed": per_seed.tolist(), "seeds": int(correct.shape[0]), "problems": int(correct.shape[1])}


def paired_difference(reference: np.ndarray, baseline: np.ndarray) -> dict[str, Any]:
    """Paired comparison on the same held-out problems: `reference[r, i]` and `baseline[r, i]` are the correctness
    of problem i in replicate r under the two policies (a policy whose outputs do not depend on the seed, such as
    the teacher, repeats one row).

    d[r, i] = reference - baseline. Returns the mean difference over seeds and problems; `se_problems`, the standard
    error over problems of the per-problem difference averaged over seeds (the paired test over problems: it
    carries the within-problem seed noise, not a shift shared by every problem of one replicate); `se_seeds`, the
    standard error over the R per-seed mean differences (that shared shift; None for one seed); `se`, their root sum
    of squares (conservative: the per-problem seed noise is counted in both); and how many problems the reference
    solves more often (`wins`) or less often (`losses`) than the baseline, averaged over seeds.
    """
    reference, baseline = np.asarray(reference, np.float64), np.asarray(baseline, np.float64)
    if reference.shape != baseline.shape or reference.ndim != 2:
        raise ValueError(f"paired_difference needs two [seeds, problems] arrays of one shape, got "
                         f"{reference.shape} and {baseline.shape}")
    d = reference - baseline
    per_problem, per_seed = d.mean(axis=0), d.mean(axis=1)
    se_problems, se_seeds = _stderr(per_problem), _stderr(per_seed)
    parts = [s for s in (se_problems, se_seeds) if s is not None]
    return {"mean": float(d.mean()), "se_problems": se_problems, "se_seeds": se_seeds,
            "se": math.sqrt(sum(s * s for s in parts)) if parts else None, "per_seed": per_seed.tolist(),
            "wins": int(np.sum(per_problem > 0)), "losses": int(np.sum(per_problem < 0)),
            "seeds": int(d.shape[0]), "problems": int(d.shape[1])}


# ------------------------------------------------------------------------------------------------ records
def per_problem_correctness(samples_path: Path) -> dict[str, float]:
    """problem id -> mean correctness over its samples, from an eval `<benchmark>.samples.jsonl`."""
    by_problem: dict[str, list[float]] = {}
    for row in read_jsonl(samples_path):
        by_problem.setdefault(str(row["problem_id"]), []).append(float(bool(row["correct"])))
    return {k: float(np.mean(v)) for k, v in by_problem.items()}


def _student_prefix(record: dict[str, Any]) -> str:
    """The student's own text before the first revise or teacher segment: what the teacher judged."""
    text = []
    for segment in record.get("segments", []):
        if segment["source"] != "student":
            break
        text.append(segment["text"])
    return "".join(text)


def synthesis_statistics(records: list[dict[str, Any]], solutions: dict[str, str], delimiter: str = ".\n\n",
                         judges_steps: bool = True) -> dict[str, Any]:
    """What a policy's records hold. Breach step t and root-cause step t* (1-based) over breached records; with
    reference `solutions` (id -> solution text; the demo's), the student's first wrong step e before the teacher
    took over: breaches that caught an error (e <= t) split by where t* fell (t* = e: the root cause found; t* < e:
    backtracked past it; t* > e: a wrong step kept in the prefix the teacher continued), false alarms (no wrong
    step up to t), errors missed (a record without a breach whose steps go wrong) and breaches whose flawed steps
    the record does not keep (motab_no_stitch, SKD step: only the safe prefix is there to check); the median V_T
    of judged student steps before the first wrong one, at it (the slip) and after it, and how often the slip fell
    under its boundary. `judges_steps` False (teacher-only, student-only, SKD token-level): no breach statistics,
    only the records' correctness and tokens."""
    breached = [r for r in records if r.get("breach_step")]
    out: dict[str, Any] = {"records": len(records), "breached": len(breached) if judges_steps else None,
                           "breach_rate": len(breached) / max(len(records), 1) if judges_steps else None}
    if breached and judges_steps:
        t = np.array([r["breach_step"] for r in breached])
        t_star = np.array([r["root_step"] or r["breach_step"] for r in breached])
        out.update({"breach_step_mean": float(t.mean()), "breach_step_hist": np.bincount(t).tolist(),
                    "root_before_breach": float(np.mean(t_star < t)),
                    "depth_hist": np.bincount(t - t_star).tolist()})
    tokens = {k: int(sum(r.get("tokens", {}).get(k, 0) for r in records)) for k in ("student", "revise", "teacher")}
    out["tokens"] = tokens
    known = [r for r in records if str(r["id"]) in solutions]
    out["records_correct"] = float(np.mean([first_wrong_step(solutions[str(r["id"])], r["response"], delimiter)
                                            is None for r in known])) if known else None
    if not known or not judges_steps:
        return out
    counts = {"caught_root_found": 0, "caught_root_earlier": 0, "caught_root_later": 0, "false_alarm": 0,
              "missed": 0, "clean": 0, "flawed_not_kept": 0}
    values: dict[str, list[float]] = {"correct": [], "slip": [], "after": []}  # V_T of judged student steps
    slips_below = []  # the slip step's V_T under its boundary eps
    for r in known:
        prefix = _student_prefix(r)
        e = first_wrong_step(solutions[str(r["id"])], prefix, delimiter)
        # Policies that keep the flawed steps (MOTAB and two of its ablations) mark the seam with a revise segment;
        # the others (motab_no_stitch, SKD step) keep only the safe prefix, so steps past it cannot be judged here.
        dropped = bool(r.get("breach_step")) and not any(seg["source"] == "revise" for seg in r.get("segments", []))
        judged = prefix.count(delimiter) if dropped else len(r.get("steps", []))
        for k, step in enumerate(r.get("steps", [])[:judged], 1):
            if step.get("value") is not None:
                values["correct" if e is None or k < e else "slip" if k == e else "after"].append(step["value"])
                if k == e:
                    slips_below.append(step["value"] < step["eps"])
        t, t_star = r.get("breach_step"), r.get("root_step") or r.get("breach_step")
        if dropped:
            counts["flawed_not_kept"] += 1
        elif t:
            if e is None or e > t:
                counts["false_alarm"] += 1
            else:
                counts["caught_root_found" if t_star == e else "caught_root_earlier" if t_star < e
                       else "caught_root_later"] += 1
        elif r.get("segments") and all(s["source"] == "student" for s in r["segments"]):
            counts["missed" if e is not None else "clean"] += 1
    out["student_errors"] = counts
    out["v_t_median"] = {k: float(np.median(v)) if v else None for k, v in values.items()}
    out["slip_below_boundary"] = float(np.mean(slips_below)) if slips_below else None
    return out


# ------------------------------------------------------------------------------------------------ the runs
def _copy(config: Any) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(config.to_dict())


def base_config(config: Any, root: Path, reference: str) -> ml_collections.ConfigDict | None:
    """The models (demo: pretrain) and the evaluation of the teacher and the initial student, in root/base."""
    base = _copy(config)
    stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
    base.stages = ",".join([s for s in stages if s in MODEL_STAGES] + (["eval"] if "eval" in stages else []))
    base.run_dir = str(root / "base")
    base.policies = reference  # fixed, so changing the compared policies never invalidates base/
    return base if base.stages else None


def replicate_config(config: Any, root: Path, replicate: int) -> ml_collections.ConfigDict:
    """Replicate r: synthesis.seed + r and sft.seed + r, the models base/ made, in root/seed<r>."""
    run = _copy(config)
    run.run_dir = str(root / f"seed{replicate}")
    run.stages = ",".join(s.strip() for s in str(config.stages).split(",") if s.strip() in REPLICATE_STAGES)
    run.synthesis.seed = int(config.synthesis.seed) + replicate
    run.sft.seed = int(config.sft.seed) + replicate
    for role in ("teacher", "student"):
        pretrained = root / "base" / "pretrain" / role / "hf"
        if not run[role].path and (pretrained / "config.json").exists():
            run[role].path = str(pretrained)
    return run


def _seed_base_evaluations(root: Path, run_dir: Path) -> None:
    """base/'s evaluations of the teacher and the initial student into a replicate (already complete there, so its
    eval stage reads them instead of sampling again)."""
    source = root / "base" / "eval"
    if not source.is_dir():
        return
    for folder in source.iterdir():
        target = run_dir / "eval" / folder.name
        if folder.is_dir() and not target.exists():
            shutil.copytree(folder, target)


def _folder_name(model: str) -> str:
    """The folder the eval stage writes a model's outputs into (run_eval_stage's naming)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("_")


def _benchmark_samples(run_dir: Path, model: str) -> dict[str, Path]:
    """benchmark name -> samples file of one evaluated model of a run."""
    folder = run_dir / "eval" / _folder_name(model)
    return {p.name.removesuffix(".samples.jsonl"): p for p in sorted(folder.glob("*.samples.jsonl"))}


def correctness_matrix(run_dirs: list[Path], model: str, benchmark: str) -> tuple[np.ndarray, list[str]]:
    """[replicates, problems] correctness of `model` on `benchmark` over the replicates' run directories, problems in
    one order (those every replicate evaluated: the pairing needs the same problems)."""
    tables = [per_problem_correctness(_benchmark_samples(d, model)[benchmark]) for d in run_dirs]
    ids = sorted(set.intersection(*(set(t) for t in tables)))
    if any(len(t) != len(ids) for t in tables):
        raise ValueError(f"{model} on {benchmark}: the replicates evaluated different problems")
    return np.array([[t[i] for i in ids] for t in tables]), ids


def _trained(label: str) -> str:
    """The eval stage's name for the student fine-tuned on policy `label`'s records."""
    return f"student after {label} SFT"


def _solutions(run_dir: Path) -> dict[str, str]:
    path = run_dir / "data" / "train.jsonl"  # the demo's synthesis questions, with their reference solutions
    return {str(r["id"]): r["solution"] for r in read_jsonl(path) if "solution" in r} if path.exists() else {}


def collect(config: Any, run_dirs: list[Path], reference: str) -> dict[str, Any]:
    """Accuracy statistics per model and benchmark, paired differences reference - each other model, and each
    policy's synthesis statistics averaged over the replicates."""
    labels = [run.label for run in policy_runs(config)]
    models = [BEFORE, TEACHER] + [_trained(label) for label in labels]
    benchmarks = sorted(_benchmark_samples(run_dirs[0], _trained(labels[0])))
    result: dict[str, Any] = {"seeds": len(run_dirs), "reference": reference, "benchmarks": {}, "synthesis": {}}
    for benchmark in benchmarks:
        matrices = {model: correctness_matrix(run_dirs, model, benchmark)[0] for model in models}
        result["benchmarks"][benchmark] = {
            "accuracy": {model: accuracy_statistics(m) for model, m in matrices.items()},
            "paired": {model: paired_difference(matrices[_trained(reference)], m) for model, m in matrices.items()
                       if model != _trained(reference)}}
    delimiter = str(config.synthesis.delimiter)
    for run in policy_runs(config):
        per_seed = [synthesis_statistics(read_jsonl(d / f"synthesis_{run.stem}.jsonl"), _solutions(d), delimiter,
                                         run.judges_steps) for d in run_dirs]
        result["synthesis"][run.label] = {"per_seed": per_seed, **_mean_of(per_seed)}
    return result


def _mean_of(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Scalar statistics averaged over seeds (histograms and counts summed)."""
    out: dict[str, Any] = {}
    for key in ("breach_rate", "breach_step_mean", "root_before_breach", "records_correct", "slip_below_boundary"):
        values = [s[key] for s in per_seed if s.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    for key in ("breach_step_hist", "depth_hist"):
        hists = [s[key] for s in per_seed if key in s]
        if hists:
            width = max(map(len, hists))
            out[key] = np.sum([h + [0] * (width - len(h)) for h in hists], axis=0).tolist()
    errors = [s["student_errors"] for s in per_seed if "student_errors" in s]
    if errors:
        out["student_errors"] = {k: sum(e[k] for e in errors) for k in errors[0]}
        out["v_t_median"] = {k: _mean_or_none([s["v_t_median"][k] for s in per_seed]) for k in ("correct", "slip", "after")}
    out["tokens"] = {k: float(np.mean([s["tokens"][k] for s in per_seed])) for k in ("student", "revise", "teacher")}
    return out


def _mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


# ------------------------------------------------------------------------------------------------ tables
def _pct(value: float | None, se: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" + ("" if se is None else f" ± {100 * se:.1f}")


def _fmt(value: float | None, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def seeds_table(result: dict[str, Any]) -> str:
    """Markdown: per benchmark, accuracy (mean ± SE over seeds, SE over problems) and the paired difference to the
    reference; then each policy's synthesis statistics."""
    reference, lines = result["reference"], []
    for benchmark, b in result["benchmarks"].items():
        lines += [f"### {benchmark}: held-out accuracy over {result['seeds']} seed(s)", "",
                  f"| model | accuracy (%) ± SE seeds | SE problems | per seed | {_trained(reference)} − model (pts) ± SE | "
                  "SE problems / seeds | problems better / worse |",
                  "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
        for name, acc in b["accuracy"].items():
            pair = b["paired"].get(name)
            diff = "-" if pair is None else f"{100 * pair['mean']:+.1f} ± {_fmt(pair['se'] and 100 * pair['se'], '{:.1f}')}"
            split = "-" if pair is None else (f"{_fmt(pair['se_problems'] and 100 * pair['se_problems'], '{:.1f}')} / "
                                              f"{_fmt(pair['se_seeds'] and 100 * pair['se_seeds'], '{:.1f}')}")
            wins = "-" if pair is None else f"{pair['wins']} / {pair['losses']}"
            lines.append(f"| {name} | {_pct(acc['mean'], acc['se_seeds'])} | {_pct(acc['se_problems'])} | "
                         f"{', '.join(f'{100 * v:.0f}' for v in acc['per_seed'])} | {diff} | {split} | {wins} |")
        lines.append("")
    lines += ["### Synthesis records (mean over seeds; histograms and counts summed)", "",
              "| policy | breach rate | breach step t: mean, histogram t=1.. | t* < t | depth t−t* histogram | "
              "records correct | student errors: root found / backtracked past / kept / false alarm / missed / clean / "
              "flawed steps not in the record "
              "| median V_T: right steps / slip / after it | slip under eps | tokens student / revise / teacher |",
              "| --- | ---: | --- | ---: | --- | ---: | --- | --- | ---: | ---: |"]
    for label, s in result["synthesis"].items():
        hist = s.get("breach_step_hist")
        e = s.get("student_errors")
        errors = "-" if not e else " / ".join(str(e[k]) for k in ("caught_root_found", "caught_root_earlier",
                                                                  "caught_root_later", "false_alarm", "missed", "clean",
                                                                  "flawed_not_kept"))
        lines.append(f"| {label} | {_fmt(s['breach_rate'])} | {_fmt(s['breach_step_mean'])}"
                     f"{'' if not hist else ': ' + ' '.join(map(str, hist[1:]))} | {_fmt(s['root_before_breach'])} | "
                     f"{' '.join(map(str, s.get('depth_hist', []))) or '-'} | {_pct(s['records_correct'])} | {errors} | "
                     f"{_values(s.get('v_t_median'))} | {_pct(s.get('slip_below_boundary'))} | "
                     f"{s['tokens']['student']:,.0f} / {s['tokens']['revise']:,.0f} / {s['tokens']['teacher']:,.0f} |")
    return "\n".join(lines)


def _values(medians: dict[str, float | None] | None) -> str:
    return "-" if not medians else " / ".join(_fmt(medians[k]) for k in ("correct", "slip", "after"))


def comparison_table(summaries: dict) -> str:
    """One replicate's table (from `run_pipeline`'s summaries): the untrained student, the teacher, then each policy's
    synthesis statistics beside the accuracy of the student fine-tuned on that policy's data."""
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


def _percent(score) -> str:
    """avg@k in percent; the eval stage records {"avg@k": ..., length fields} per benchmark (a number in runs
    recorded before the length fields existed)."""
    value = score.get("avg@k") if isinstance(score, dict) else score
    return "-" if value is None else f"{100 * value:.1f}"


def main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("motab_jax").setLevel(logging.INFO)
    config = _CONFIG.value
    if config.policies in ("", "motab,teacher_only"):  # not narrowed on the command line
        config.policies = ALL_POLICIES
    labels = [run.label for run in policy_runs(config)]
    if _REFERENCE.value not in labels:
        raise app.UsageError(f"--reference={_REFERENCE.value!r} is not among the policies {labels}")
    if _SEEDS.value < 1:
        raise app.UsageError(f"--seeds={_SEEDS.value}: give at least 1")
    root = Path(str(config.run_dir).removesuffix("_compare") + "_compare")
    base = base_config(config, root, _REFERENCE.value)
    if base is not None:
        run_pipeline(base)
    run_dirs = []
    for replicate in range(_SEEDS.value):
        run = replicate_config(config, root, replicate)
        _seed_base_evaluations(root, Path(run.run_dir))
        summaries = run_pipeline(run)
        (Path(run.run_dir) / "comparison.md").write_text(comparison_table(summaries) + "\n")
        run_dirs.append(Path(run.run_dir))
    result = collect(config, run_dirs, _REFERENCE.value)
    table = seeds_table(result)
    (root / "comparison.md").write_text(table + "\n")
    (root / "comparison.json").write_text(json.dumps(result, indent=2))
    print("\n" + table)


if __name__ == "__main__":
    app.run(main)
