"""Every bad input or environment problem ends in one `MotabInputError` naming the input and what to do (library
and run.py alike); JSONL is read as JSONL by every reader; Ctrl-C stops run.py with one line; data inputs are
checked before any weights load."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import motab_jax
from configs import demo
from fixtures.make_golden import GOLDEN_DIR
from motab_jax.data import InvalidRecordError, read_examples
from motab_jax.data.questions import read_question_file, read_questions
from motab_jax.errors import (CheckpointError, EnvironmentProblem, MissingInputError, MotabInputError,
                              PromptTooLongError)
from motab_jax.eval.benchmarks import read_jsonl_problems
from motab_jax.jsonl import JsonlError, append_records, iter_jsonl, read_json, read_jsonl, read_records
from motab_jax.models.config import UnsupportedModelError, config_from_hf
from motab_jax.models.safetensors_io import SafetensorsFile
from motab_jax.pipeline import ConfigError, preflight, run_pipeline, validate_config
from motab_jax.pipeline.inputs import benchmark_problems, question_problems, unknown_field_message

ROOT = Path(__file__).resolve().parents[1]
# Every character str.splitlines() splits on besides "\n": json.dumps(ensure_ascii=False) writes the last three raw.
LINE_BREAKS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _lines(path: Path, rows: list) -> Path:
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return path


# ------------------------------------------------------------------------------------ JSONL read as JSONL


def test_every_jsonl_reader_keeps_unicode_line_breaks_inside_records(tmp_path):
    texts = [f"step one{c}step two {c!r}" for c in LINE_BREAKS] + ["all:" + "\r\n".join(LINE_BREAKS)]
    records = [{"id": f"q{i}", "sample_index": 0, "problem": t, "answer": t, "prompt": t, "response": t,
                "segments": [{"source": "student", "text": t}]} for i, t in enumerate(texts)]
    path = tmp_path / "synthesis.jsonl"
    list(append_records(path, records))
    raw = path.read_text(encoding="utf-8")
    assert "\u2028" in raw and "\x85" in raw  # written raw: a str.splitlines() reader would cut these records
    assert len(raw.splitlines()) > len(records)

    def texts_of(rows, field):
        return [r[field] for r in rows]

    assert texts_of(read_records(path, ("id", "sample_index")).values(), "response") == texts
    assert texts_of(read_jsonl(path), "response") == texts
    assert [value["problem"] for value, _ in iter_jsonl(path)] == texts
    assert [e.response for e in read_examples(path)[0]] == texts  # the SFT reader (.jsonl)
    shutil.copy(path, tmp_path / "synthesis.json")
    assert [e.response for e in read_examples(tmp_path / "synthesis.json")[0]] == texts  # .json holding JSONL
    assert texts_of(read_question_file(path), "problem") == texts  # the question file (preflight and synthesis)
    assert texts_of(read_questions(path, limit=3), "problem") == texts[:3]
    assert [p.problem for p in read_jsonl_problems(path)] == texts  # benchmark files
    spec = importlib.util.spec_from_file_location("plots", ROOT / "experiments" / "plots.py")
    plots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plots)
    assert texts_of(plots.load_records(path), "response") == texts


def test_jsonl_lines_that_are_not_json_name_file_and_line(tmp_path):
    path = _lines(tmp_path / "a.jsonl", [{"id": 1}, b'{"id": 2\n', {"id": 3}])
    with pytest.raises(JsonlError, match=rf"{re.escape(str(path))}:2: malformed JSON line"):
        read_jsonl(path)
    torn = _lines(tmp_path / "torn.jsonl", [{"id": 1}, b'{"id": 2'])
    assert read_jsonl(torn, torn_tail=True) == [{"id": 1}]  # what a killed writer leaves
    with pytest.raises(JsonlError, match=r"torn\.jsonl:2: malformed JSON line"):
        read_jsonl(torn)
    assert list(read_records(torn, ("id",))) == [(1,)] and torn.read_bytes() == b'{"id": 1}\n'  # cut on resume
    with pytest.raises(MissingInputError, match="no such file"):
        read_jsonl(tmp_path / "absent.jsonl")


# --------------------------------------------------------------------- one family, messages naming the input


def _question_cases(tmp_path: Path) -> list[tuple[Path, str]]:
    q = {"id": "a", "problem": "1 + 1"}
    return [
        (_lines(tmp_path / "utf8.jsonl", [q, b'{"id": "b", "problem": "caf\xe9"}\n']),
         r"utf8\.jsonl:2: not valid UTF-8 \(byte 28 of the line is b'\\xe9'\)"),
        (_lines(tmp_path / "dup.jsonl", [q, {"id": "b", "problem": "x"}, {"id": "a", "problem": "y"}]),
         r"dup\.jsonl:3: id 'a' repeats the id of .*dup\.jsonl:1; question ids must be unique"),
        (_lines(tmp_path / "empty.jsonl", [b"\n"]), r"empty\.jsonl: no questions \(the file is empty\)"),
        (_lines(tmp_path / "json.jsonl", [q, b'{"id": "b", "problem": "x"\n']),
         r"json\.jsonl:2: malformed JSON line \(Expecting ',' delimiter"),
        (_lines(tmp_path / "blank.jsonl", [{"id": "a", "problem": "  "}]), r"blank\.jsonl:1: field 'problem' is empty"),
        (_lines(tmp_path / "field.jsonl", [{"id": "a", "text": "x"}]),
         r"field\.jsonl:1: no 'problem', 'question', 'prompt' or 'prompt_ids' field \(fields: \['id', 'text'\]\)"),
        (_lines(tmp_path / "list.jsonl", [["a"]]), r"list\.jsonl:1: a question must be an object .* got list"),
        (_lines(tmp_path / "ids.jsonl", [{"id": "a", "prompt_ids": [1, -2]}]),
         r"ids\.jsonl:1: field 'prompt_ids' must be a non-empty list of token ids"),
    ]


def test_question_file_problems_name_file_and_line(tmp_path):
    for path, pattern in _question_cases(tmp_path):
        with pytest.raises(MotabInputError, match=pattern):
            read_question_file(path)


def test_library_questions_get_the_same_checks():
    from motab_jax.motab.synthesize import parse_questions

    with pytest.raises(InvalidRecordError, match=r"question 2: id 'a' repeats the id of question 0"):
        parse_questions([{"id": "a", "problem": "x"}, "y", {"id": "a", "problem": "z"}])
    with pytest.raises(InvalidRecordError, match=r"question 0: no 'problem'"):
        parse_questions([{"id": "a"}])


def test_checkpoint_and_model_files_name_the_file(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(GOLDEN_DIR / "llama3_untied", folder)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    header_size = int.from_bytes(weights.read_bytes()[:8], "little")
    header = json.loads(weights.read_bytes()[8:8 + header_size])
    last = max((e["data_offsets"][1], name) for name, e in header.items() if name != "__metadata__")[1]
    with open(weights, "r+b") as f:
        f.truncate(size - 1)  # a download one byte short: only the last tensor is cut
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))}: truncated: the file has {size - 1} bytes "
                                              rf"but tensor {re.escape(last)} \(the first cut off, of 1\) ends at byte "
                                              rf"{size}"):
        motab_jax.load(folder)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(60))
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: tensor w: bytes \[0, 60\) do not hold its shape "
                                              r"\(4, 4\) of F32"):
        SafetensorsFile(tmp_path / "bad.safetensors")
    (folder / "config.json").write_text("{model_type: llama")
    with pytest.raises(JsonlError, match=rf"{re.escape(str(folder / 'config.json'))}: not valid JSON"):
        read_json(folder / "config.json")
    config = demo.get_config()
    config.teacher.path = str(folder)
    with pytest.raises(MotabInputError, match=r"config\.json: not valid JSON"):  # the preflight reads it first
        preflight(config)
    from motab_jax.models.gguf import read_gguf
    from test_gguf import _write_tiny_gguf

    _write_tiny_gguf(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    for cut in (len(data) - 100, 200, 10):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"cut\.gguf: (not a readable GGUF file, corrupt or truncated|"
                                                  r"truncated: )"):
            read_gguf(tmp_path / "cut.gguf")
    hf = json.loads((GOLDEN_DIR / "llama3_untied" / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match=r"x/config\.json: model_type 'mistral' is not supported") as e:
        config_from_hf({**hf, "model_type": "mistral"}, source="x/config.json")
    assert isinstance(e.value, MotabInputError)


def test_data_and_environment_errors_are_in_the_family(tmp_path):
    bad = _lines(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, b"{oops\n"])
    with pytest.raises(InvalidRecordError, match=r"sft\.jsonl:2: malformed JSON line"):
        read_examples(bad)
    from motab_jax.data import Example, build_sft_rows
    from motab_jax.text import byte_level_tokenizer

    too_long = [Example(id="a", prompt="x" * 50, response="y"), Example(id="b", prompt="x" * 60, response="y")]
    with pytest.raises(MotabInputError, match=r"no training rows from 2 examples \(2 with a prompt that fills "
                                              r"cutoff_len=16"):
        build_sft_rows(too_long, byte_level_tokenizer(), 16, cutoff_len=16)
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # tests/conftest.py
    with pytest.raises(EnvironmentProblem, match=r"'hf:owner/data': HF_HUB_OFFLINE is set"):
        read_examples("hf:owner/data")
    if os.path.exists("/dev/full"):  # a device that is always full: a real ENOSPC
        with pytest.raises(EnvironmentProblem, match=r"appending a record to /dev/full: no space left on the "
                                                     r"device; free space .* finished work is kept"):
            list(append_records("/dev/full", [{"id": "a" * 10000}]))


def test_unknown_config_field_names_it_and_the_close_ones():
    config = demo.get_config()
    assert unknown_field_message(config, "synthesis.eps0") is None
    message = unknown_field_message(config, "epsilon")
    assert message.startswith("'epsilon': the configuration has no field 'epsilon'; did you mean ")
    assert {"synthesis.eps0", "sft.eps", "kd.eps"} <= set(message.split("did you mean ")[1].split("?")[0].split(", "))
    assert "section 'sft' has no field 'epohcs'; did you mean sft.epochs" in unknown_field_message(config, "sft.epohcs")


# ----------------------------------------------------------------- prompt limits on every path into the engine


def test_prompts_longer_than_max_prompt_len_are_refused_on_every_path():
    from motab_jax.motab.config import resolve_config
    from motab_jax.motab.driver import Job, run_engine
    from motab_jax.motab.pool import plan_pool
    from motab_jax.motab.synthesize import engine_spec
    from motab_jax.motab.transition import EngineTables
    from motab_jax.text import token_bytes_table

    model, tok = motab_jax.load(GOLDEN_DIR / "qwen3_untied", dtype="float32")
    cfg = dict(num_slots=2, samples_per_question=1, traj_cap=16, step_cap=8, max_prompt_len=8, teacher_min_budget=4,
               max_steps=4, temperature=0.0, teacher_temperature=0.0, instruction="", prompt_format="raw")
    with pytest.raises(PromptTooLongError, match=r"question 'long': prompt_ids has 9 tokens > max_prompt_len=8"):
        list(motab_jax.synthesize(model, model, tok, [{"id": "long", "prompt_ids": [5] * 9}], cfg, progress=False))
    with pytest.raises(PromptTooLongError, match=r"question 'text': prompt has \d+ tokens > max_prompt_len=8"):
        list(motab_jax.synthesize(model, model, tok, [{"id": "text", "problem": "x " * 20}], cfg, progress=False))
    resolved = resolve_config(cfg)
    pool = plan_pool(num_slots=2, page_size=8, max_len=64, max_prompt_len=8, token_bytes=64, num_pages=32,
                     memory_budget_gb=0.0, weight_bytes=0.0, margin_bytes=0.0)
    tables = EngineTables.build(token_bytes_table(tok), model.config.output_vocab_size, resolved["delimiter"], [0])
    jobs = [Job(0, (5,) * 8, 0), Job(1, (5,) * 9, 1)]
    with pytest.raises(PromptTooLongError, match=r"engine job 1: the prompt has 9 tokens > max_prompt_len=8"):
        next(run_engine(engine_spec(resolved), model, model, tables, jobs, pool=pool, paged_impl="reference",
                        iterations_per_sync=4, seed=0))


# ---------------------------------------------------------------------- data inputs checked before weights load


def test_data_inputs_are_checked_before_any_weights_load(tmp_path):
    config = demo.get_config()
    config.stages, config.policies, config.eval.benchmarks = "synthesize,eval", "motab", "math500"
    config.run_dir = str(tmp_path / "never")
    for path, pattern in _question_cases(tmp_path):  # each refused before the run directory, let alone the models
        config.data.questions = str(path)
        with pytest.raises(ConfigError, match=r"invalid configuration:\n  - data\.questions: .*" + pattern):
            run_pipeline(config)
    assert not (tmp_path / "never").exists()
    no_answer = _lines(tmp_path / "bench.jsonl", [{"id": 1, "problem": "p", "answer": "1"}, {"id": 2, "problem": "q"}])
    config.eval.benchmarks = f"math500,{no_answer}"
    assert benchmark_problems(config.eval, ["eval"]) == [
        f"eval.benchmarks: {no_answer}:2: missing field(s) ['answer'] (fields: ['id', 'problem'])"]
    config.eval.benchmarks = "gpqa_diamond"
    assert "comes from the Hugging Face hub" in benchmark_problems(config.eval, ["eval"])[0]
    config.data.questions = "hf:owner/questions@train"
    assert question_problems(config.data, ["synthesize"]) == [
        "data.questions: 'hf:owner/questions@train': HF_HUB_OFFLINE is set, so the hub dataset 'owner/questions' "
        "cannot be downloaded; unset HF_HUB_OFFLINE, or save the dataset to disk (save_to_disk or JSONL/Parquet "
        "export) and pass its local path"]


def test_run_dir_that_cannot_hold_outputs_is_refused(tmp_path):
    config = demo.get_config()
    (tmp_path / "file").write_text("x")
    config.run_dir = str(tmp_path / "file")
    assert any("run_dir=" in p and "is a file, not a folder" in p for p in validate_config(config))
    config.run_dir = str(tmp_path / "file" / "run")
    assert any("is under" in p and "which is a file" in p for p in validate_config(config))
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        config.run_dir = str(locked / "run")
        assert any("is not writable" in p for p in validate_config(config))


# ----------------------------------------------------------------------------------------------- run.py


def test_run_py_prints_one_error_line_for_a_bad_command_line(tmp_path):
    result = subprocess.run([sys.executable, "run.py", "--config.synthesis.epz=0.3", f"--config.run_dir={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --config.synthesis.epz: section 'synthesis' has no field 'epz'; did you mean synthesis.eps0, "
        "sft.eps, kd.eps, synthesis.entropy_zero? (configs/base.py lists every field)"]


def _run_module():
    spec = importlib.util.spec_from_file_location("run_module", ROOT / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)  # defines no flag: that happens under __main__
    return run


def test_run_py_names_a_config_file_that_is_missing_or_broken(tmp_path):
    run = _run_module()
    missing = str(tmp_path / "nope.py")
    assert run._describe(OSError(), ["run.py", f"--config={missing}"]) == (
        f"--config={missing}: no such file; give a config file, e.g. --config=configs/demo.py")
    (tmp_path / "broken.py").write_text("def get_config():\n    return undefined_name\n")
    assert run._describe(OSError(), ["run.py", f"--config={tmp_path / 'broken.py'}"]) == (
        f"--config={tmp_path / 'broken.py'}: line 2: NameError: name 'undefined_name' is not defined")
    assert run._describe(OSError(), ["run.py", "--config=configs/limo.py", "--config.sft.epohcs=3"]).startswith(
        "--config.sft.epohcs: section 'sft' has no field 'epohcs'; did you mean sft.epochs")


def test_ctrl_c_stops_run_py_with_one_line_and_keeps_the_run_directory(tmp_path):
    """SIGINT while a stage runs: exit 128 + 2, one line saying how to resume (no traceback), noted in run.log."""
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "run.py", "--config.stages=models", f"--config.run_dir={run}",
                                "--config.data.demo_train=4", "--config.data.demo_held_out=2"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # As in a terminal: a suite started in the background by a non-interactive shell
                               # inherits SIGINT ignored, which run.py rightly keeps (it would never see Ctrl-C).
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        log = run / "run.log"
        if log.exists() and "stage models: started" in log.read_text():
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    line = (f"stopped by SIGINT; finished work (records, checkpoints, finished stages) is kept in {run}: rerun the "
            "same command to continue")
    assert stderr.strip().splitlines()[-1] == line
    assert line in (run / "run.log").read_text()
    assert (run / "config.json").exists() and not (run / "stages" / "models.done").exists()


def test_sigterm_unwinds_like_ctrl_c():
    """run.py turns SIGTERM (a scheduler's stop) into the same unwinding as Ctrl-C, remembering which it was."""
    run = _run_module()
    previous = signal.signal(signal.SIGTERM, run._stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises as soon as the signal is delivered
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert run._stopped_by == [signal.SIGTERM]
