"""experiments/plots.py on a small synthetic run directory: the PNGs it writes, what it skips, bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import pytest

PLOTS_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "plots.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EPS0, THETA = 0.25, 1.5


@pytest.fixture(scope="module")
def plots():
    spec = importlib.util.spec_from_file_location("motab_plots", PLOTS_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _step(start: int, value: float | None, entropy: float) -> dict:
    return {"start": start, "value": value, "eps": EPS0 * math.exp(-THETA * entropy), "entropy": entropy}


def _record(i: int, values: list[float], entropies: list[float], breach: int | None, root: int | None,
            policy: str = "motab") -> dict:
    return {"id": f"q{i}", "sample_index": 0, "policy": policy, "response": "x",
            "steps": [_step(10 * k, v, h) for k, (v, h) in enumerate(zip(values, entropies))],
            "breach_step": breach, "root_step": root, "tokens": {"student": 5, "revise": 2, "teacher": 7},
            "segments": [{"source": "student", "text": "x", "num_tokens": 1, "token_ids": [1]}]}


def _write_jsonl(path: pathlib.Path, records: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


@pytest.fixture()
def run_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    (tmp_path / "config.json").write_text(json.dumps({"synthesis": {"eps0": EPS0, "theta": THETA}}))
    motab = [
        _record(0, [0.9, 0.8, 0.6, 0.01], [0.2, 0.5, 1.0, 1.2], breach=4, root=2),
        _record(1, [0.7, 0.002], [0.3, 2.5], breach=2, root=1),
        _record(2, [0.95, 0.9, 0.85], [0.1, 0.4, 0.9], breach=None, root=None),
        _record(3, [0.5, 0.6, 0.7, 0.8, 0.05], [0.4, 0.6, 0.8, 1.0, 0.3], breach=5, root=5),
    ]
    _write_jsonl(tmp_path / "synthesis_motab.jsonl", motab, tail='{"id": "q4", "sample_ind')  # torn last line
    teacher = [_record(i, [], [], None, None, policy="teacher_only") for i in range(3)]
    _write_jsonl(tmp_path / "synthesis_teacher_only.jsonl", teacher)
    return tmp_path


def _assert_png(path: pathlib.Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    from PIL import Image
    with Image.open(path) as image:
        image.load()
        width, height = image.size
    assert width >= 300 and height >= 200, (path, image.size)


def test_plot_run_writes_pngs_and_skips_empty(plots, run_dir: pathlib.Path, caplog) -> None:
    with caplog.at_level("INFO", logger="plots"):
        paths = plots.plot_run(run_dir, examples=3)
    out = run_dir / "plots"
    expected = {out / f"{kind}_motab.png" for kind in ("traces", "breach_depth", "entropy_boundary")}
    assert set(paths) == expected
    for path in paths:
        _assert_png(path)
    assert not list(out.glob("*teacher_only*"))
    assert "torn last line" in caplog.text
    for kind in ("traces", "breach_depth", "entropy_boundary"):
        assert f"teacher_only: skipped {kind}" in caplog.text


def test_plot_run_one_policy_and_out_dir(plots, run_dir: pathlib.Path, tmp_path_factory) -> None:
    out = tmp_path_factory.mktemp("out")
    assert plots.plot_run(run_dir, out, policies=["teacher_only"]) == []
    paths = plots.plot_run(run_dir, out, policies=["motab"], examples=1)
    assert {p.name for p in paths} == {"traces_motab.png", "breach_depth_motab.png", "entropy_boundary_motab.png"}
    with pytest.raises(FileNotFoundError, match="synthesis_skd_step.jsonl"):
        plots.plot_run(run_dir, out, policies=["skd_step"])


def test_cli_main(plots, run_dir: pathlib.Path, capsys) -> None:
    plots.main([str(run_dir), "--out", str(run_dir / "cli"), "--policy", "motab,teacher_only", "--examples", "2"])
    printed = capsys.readouterr().out.split()
    assert len(printed) == 3 and all(pathlib.Path(p).parent == run_dir / "cli" for p in printed)


def test_load_records_torn_and_malformed(plots, run_dir: pathlib.Path) -> None:
    records = plots.load_records(run_dir / "synthesis_motab.jsonl")
    assert [r["id"] for r in records] == ["q0", "q1", "q2", "q3"]
    bad = run_dir / "synthesis_bad.jsonl"
    lines = (run_dir / "synthesis_motab.jsonl").read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:4]) + "\n")
    with pytest.raises(ValueError, match=rf"{bad.name}:3\b"):
        plots.load_records(bad)
    with pytest.raises(ValueError, match=rf"{bad.name}:3\b"):
        plots.plot_run(run_dir, policies=["bad"])


def test_boundary_params(plots, run_dir: pathlib.Path) -> None:
    records = plots.load_records(run_dir / "synthesis_motab.jsonl")
    assert plots.boundary_params({"synthesis": {"eps0": EPS0, "theta": THETA}}, records) == (EPS0, THETA)
    assert plots.boundary_params({}, []) == (0.2, 1.0)
    # A per-policy override the config does not show (motab@theta=1.5 under a theta=1 config): fitted.
    eps0, theta = plots.boundary_params({"synthesis": {"eps0": 0.2, "theta": 1.0}}, records)
    assert eps0 == pytest.approx(EPS0) and theta == pytest.approx(THETA)
