"""Plots of a synthesis run: per-step oracle traces, breach / root-cause depth, entropy vs the boundary.

    python experiments/plots.py <run_dir> [--out <dir>] [--policy motab] [--examples 6]

Reads `<run_dir>/synthesis_<stem>.jsonl` (every one, or only the stems given with --policy, repeatable or
comma-separated) and `<run_dir>/config.json` (synthesis.eps0 / theta; 0.2 / 1.0 if absent), and writes for
each stem into --out (default `<run_dir>/plots`):

    traces_<stem>.png            V_T and eps per step for up to --examples trajectories (breached ones first),
                                 with the breach step t and the root-cause step t* marked
    breach_depth_<stem>.png      histograms of the breach step t and of the root-cause depth t - t*
    entropy_boundary_<stem>.png  teacher entropy H against V_T for every judged step, with eps0*exp(-theta*H)

A plot without data (teacher_only judges no step) is skipped and logged. From a notebook:
`plot_run(run_dir)` returns the paths written. Needs only json, numpy and matplotlib
(figures are drawn with matplotlib's object API: no display, and a notebook's pyplot backend is left alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
from collections.abc import Iterable
from typing import Any

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

log = logging.getLogger("plots")
DEFAULT_EPS0, DEFAULT_THETA, TOP_K = 0.2, 1.0, 20
V_FLOOR = 1e-12  # V_T is in (0, 1]; an underflowed 0 is drawn here on the log axis


def load_records(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The JSON records of a .jsonl file; an unparseable last line (a torn write) is skipped, an
    unparseable line elsewhere raises ValueError naming `file:line`."""
    path = pathlib.Path(path)
    # JSONL lines end with "\n" only: str.splitlines() would also split on U+2028, U+0085, ... inside the text.
    lines = path.read_text(encoding="utf-8").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a {type(record).__name__}, not an object")
        except ValueError as e:
            if number == len(lines):
                log.warning("%s:%d: skipping a torn last line", path, number)
                break
            raise ValueError(f"{path}:{number}: malformed record: {e}") from None
        records.append(record)
    return records


def boundary_params(config: dict[str, Any], records: list[dict[str, Any]]) -> tuple[float, float]:
    """(eps0, theta) of the run's boundary: config.json's, unless the eps the records hold (a per-policy
    override such as motab@theta=2, or an ablation's theta=0) disagree; then the least-squares fit of
    log eps = log eps0 - theta * H to them."""
    synthesis = config.get("synthesis", {})
    eps0, theta = float(synthesis.get("eps0", DEFAULT_EPS0)), float(synthesis.get("theta", DEFAULT_THETA))
    pts = np.array([(s["entropy"], s["eps"]) for r in records for s in r.get("steps", [])
                    if s.get("value") is not None and s.get("eps", 0) > 0], float).reshape(-1, 2)
    if len(pts) == 0 or np.allclose(pts[:, 1], eps0 * np.exp(-theta * pts[:, 0]), rtol=1e-3):
        return eps0, theta
    if np.ptp(pts[:, 0]) > 1e-6:
        slope, intercept = np.polyfit(pts[:, 0], np.log(pts[:, 1]), 1)
        return float(np.exp(intercept)), float(-slope)
    return float(np.exp(np.mean(np.log(pts[:, 1])))), 0.0


def _judged(record: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(1-based step, step) for every step the teacher scored."""
    return [(i, s) for i, s in enumerate(record.get("steps", []), 1) if s.get("value") is not None]


def _label(record: dict[str, Any]) -> str:
    return f"{record.get('id', '?')} #{record.get('sample_index', 0)}"


def plot_traces(records: list[dict[str, Any]], stem: str, out: pathlib.Path, examples: int) -> pathlib.Path | None:
    # Breached first, those that backtracked furthest (t - t*) and ran longest leading; then the rest.
    chosen = sorted((r for r in records if _judged(r)), key=lambda r: (
        not r.get("breach_step"), -(r.get("breach_step") or 0) + (r.get("root_step") or 0), -len(r["steps"])))
    chosen = chosen[:examples]
    if not chosen:
        return None
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, record in zip(axes.flat, chosen):
        steps = record["steps"]
        x = np.arange(1, len(steps) + 1)
        values = np.array([np.nan if s.get("value") is None else max(s["value"], V_FLOOR) for s in steps])
        ax.plot(x, values, "o-", color="tab:blue", ms=4, label="$V_T$")
        ax.plot(x, [s["eps"] for s in steps], "--", color="tab:gray", label=r"$\epsilon$")
        t, root = record.get("breach_step"), record.get("root_step")
        if t and t <= len(steps) and not np.isnan(values[t - 1]):
            ax.plot([t], [values[t - 1]], "X", color="tab:red", ms=10, zorder=5)
        if t:
            ax.axvline(t, color="tab:red", lw=1.2, label=f"breach t={t}")
        if root:
            ax.axvline(root, color="tab:orange", lw=1.2, ls=":", label=f"root t*={root}")
        _log_y(ax, subs=(1.0, 2.0, 5.0))
        ax.set_xlim(0.5, max(len(steps), t or 0) + 0.5)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_title(_label(record) + ("" if t else " (no breach)"), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(r"$V_T$, $\epsilon$", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(chosen):]:
        ax.set_visible(False)
    fig.suptitle(f"{stem}: per-step teacher value $V_T$ and boundary $\\epsilon$", fontsize=11)
    return _save(fig, out / f"traces_{stem}.png")


def plot_breach_depth(records: list[dict[str, Any]], stem: str, out: pathlib.Path) -> pathlib.Path | None:
    breached = [r for r in records if r.get("breach_step")]
    if not breached:
        return None
    t = np.array([r["breach_step"] for r in breached])
    depth = np.array([r["breach_step"] - (r.get("root_step") or r["breach_step"]) for r in breached])
    fig = Figure(figsize=(10, 3.8))
    left, right = fig.subplots(1, 2)
    for ax, data, color, xlabel in ((left, t, "tab:red", "breach step t"),
                                    (right, depth, "tab:orange", "root-cause depth t - t*")):
        ax.hist(data, bins=np.arange(data.min() - 0.5, data.max() + 1.5), color=color, edgecolor="black", alpha=0.8)
        ax.axvline(data.mean(), color="black", ls="--", lw=1, label=f"mean {data.mean():.2f}")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("trajectories")
        ax.legend(fontsize=8)
    fig.suptitle(f"{stem}: breach rate {len(breached)}/{len(records)} = {len(breached) / len(records):.2f}")
    return _save(fig, out / f"breach_depth_{stem}.png")


def plot_entropy_boundary(records: list[dict[str, Any]], stem: str, out: pathlib.Path,
                          eps0: float, theta: float) -> pathlib.Path | None:
    accepted, breaching = [], []
    for record in records:
        for i, step in _judged(record):
            point = (step.get("entropy", 0.0), max(step["value"], V_FLOOR))
            (breaching if i == record.get("breach_step") else accepted).append(point)
    if not accepted and not breaching:
        return None
    h = np.linspace(0.0, math.log(TOP_K), 200)
    curve = eps0 * np.exp(-theta * h)
    floor = min(curve.min(), 1.0) / 100  # values further below are drawn on the bottom edge (open markers)
    fig = Figure(figsize=(7, 4.8))
    ax = fig.subplots()
    for points, color, marker, size, label in ((accepted, "tab:blue", "o", 14, "accepted"),
                                               (breaching, "tab:red", "X", 50, "breach")):
        if points:
            hs, vs = np.array(points).T
            low = vs < floor
            note = f", {low.sum()} below {floor:.0e} on the bottom edge" if low.any() else ""
            ax.scatter(hs[~low], vs[~low], c=color, marker=marker, s=size, alpha=0.5 if label == "accepted" else 0.85,
                       label=f"{label} steps ({len(points)}{note})")
            ax.scatter(hs[low], np.full(low.sum(), floor * 1.15), facecolors="none", edgecolors=color, marker="v", s=40)
    rate = "" if theta == 0 else rf"\,e^{{-{'' if theta == 1 else f'{theta:g}'}H}}"
    ax.plot(h, curve, color="black", lw=1.8, label=rf"boundary $\epsilon = {eps0:g}{rate}$")
    ax.set_ylim(floor, 1.5)
    _log_y(ax)
    ax.set_xlim(-0.03, math.log(TOP_K) * 1.02)
    ax.set_xlabel(f"teacher top-{TOP_K} entropy H at the state before the step (nats)")
    ax.set_ylabel("$V_T$ (geometric-mean teacher probability)")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{stem}: step value against the entropy-adaptive boundary")
    return _save(fig, out / f"entropy_boundary_{stem}.png")


def _log_y(ax: Any, subs: tuple[float, ...] = (1.0,)) -> None:
    """Log y axis with ticks at subs * 10^k labelled 0.05, 0.1, ... (no minor labels); a light major grid."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(alpha=0.3)


def _save(fig: Any, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_run(run_dir: str | pathlib.Path, out_dir: str | pathlib.Path | None = None,
             policies: Iterable[str] | None = None, examples: int = 6) -> list[pathlib.Path]:
    """Writes the plots of every `synthesis_<stem>.jsonl` in `run_dir` (or of the stems in `policies`) into
    `out_dir` (default run_dir/plots) and returns their paths."""
    run_dir = pathlib.Path(run_dir)
    out = pathlib.Path(out_dir) if out_dir is not None else run_dir / "plots"
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if policies is None:
        files = sorted(run_dir.glob("synthesis_*.jsonl"))
    else:
        files = [run_dir / f"synthesis_{p}.jsonl" for p in policies]
        if missing := [str(f) for f in files if not f.exists()]:
            raise FileNotFoundError(f"no synthesis output: {', '.join(missing)}")
    if not files:
        raise FileNotFoundError(f"no synthesis_*.jsonl in {run_dir}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file in files:
        stem = file.stem.removeprefix("synthesis_")
        records = load_records(file)
        if not records:
            log.info("%s: no records, nothing plotted", stem)
            continue
        eps0, theta = boundary_params(config, records)
        made = {"traces": plot_traces(records, stem, out, examples),
                "breach_depth": plot_breach_depth(records, stem, out),
                "entropy_boundary": plot_entropy_boundary(records, stem, out, eps0, theta)}
        for name, path in made.items():
            if path is None:
                log.info("%s: skipped %s (no %s)", stem, name,
                         "breached trajectory" if name == "breach_depth" else "judged step")
            else:
                written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="output folder (default run_dir/plots)")
    parser.add_argument("--policy", action="append", default=None,
                        help="file stem(s) to plot, repeatable or comma-separated (default: all)")
    parser.add_argument("--examples", type=int, default=6, help="trajectories in the traces plot")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    policies = None if args.policy is None else [p.strip() for e in args.policy for p in e.split(",") if p.strip()]
    for path in plot_run(args.run_dir, args.out, policies, args.examples):
        print(path)


if __name__ == "__main__":
    main()
