"""run.py's job on the embedded demo: validation, outputs, and skipping finished stages."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from configs import demo
from motab_jax.pipeline import ConfigError, run_pipeline, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_demo_models_stage_and_resume(tmp_path):
    config = demo.get_config()
    config.stages = "models"
    config.run_dir = str(tmp_path / "run")
    config.mesh.data, config.mesh.tensor = 2, 4  # a real 2 x 4 mesh over the 8 host devices
    summary = run_pipeline(config)["models"]
    assert [m["role"] for m in summary["models"]] == ["teacher", "student"]
    assert 0.0 <= summary["top1_agreement"] <= 1.0 and summary["reverse_kl"] > 0
    run = Path(config.run_dir)
    assert (run / "student_hf" / "model.safetensors").exists()
    assert json.loads((run / "config.json").read_text())["student"]["init"]["num_layers"] == 2
    # A rerun skips the finished stage and returns its recorded summary.
    (run / "student_hf" / "model.safetensors").unlink()
    assert run_pipeline(config)["models"]["top1_agreement"] == summary["top1_agreement"]
    assert not (run / "student_hf" / "model.safetensors").exists()


@pytest.mark.parametrize("field,value,pattern", [
    ("stages", "distill", "unknown stage 'distill'"),
    ("stages", "train", "unknown stage 'train'"),
    ("student.dtype", "fp8", r"student\.dtype='fp8'"),
    ("teacher.tokenizer", "gpt2", r"teacher\.tokenizer='gpt2'"),
    ("teacher.path", "./missing", r"teacher\.path='./missing'"),
    ("mesh.tensor", 3, "mesh: "),
    ("synthesis.eps0", 0.0, r"synthesis\.eps0=0\.0: must be in \(0, 1\]"),
    ("synthesis.eps0", 1.5, r"synthesis\.eps0=1\.5: must be in \(0, 1\]"),
    ("synthesis.theta", -0.5, r"synthesis\.theta=-0\.5: must be >= 0"),
    ("synthesis.top_p", 0.0, r"synthesis\.top_p=0\.0: must be in \(0, 1\]"),
    ("synthesis.num_slots", 0, r"synthesis\.num_slots=0: must be an integer >= 1"),
    ("synthesis.delimiter", "", r"synthesis\.delimiter='': must be a non-empty string"),
    ("policies", "motab,best", r"unknown policy 'best'.*accepted: motab"),
    ("policies", "skd_step@gamma=x", r"skd_step@gamma=x"),
    ("policies", "skd_step@gama=0.8", r"'gama=0.8'.*eps0, theta, gamma"),
    ("policies", "motab,motab", r"repeat a run"),
    ("synthesis.policy", "skd_step", r"synthesis\.policy='skd_step' is ignored because policies='motab,teacher_only'"),
    ("sft.learning_rate", 0.0, r"sft\.learning_rate=0\.0: must be > 0"),
    ("sft.micro_batches", 3, r"sft\.micro_batches=3 must divide sft\.global_batch_size=16"),
    ("kd.loss", "kl", r"kd\.loss='kl': accepted \['akl'"),
    ("kd.from_policy", "skd_step", r"kd\.from_policy='skd_step': not among policies"),
    ("policies", "motab,skd_step@gamma=0.8&theta=x", r"'skd_step@gamma=0.8&theta=x': theta='x' is not a number"),
    ("eval.benchmarks", "math500,mmlu", r"'mmlu' is not a known benchmark"),
    ("eval.top_p", 1.5, r"eval\.top_p=1\.5: must be in \(0, 1\]"),
    ("data.questions", "missing.jsonl", r"data\.questions='missing\.jsonl': no such file"),
])
def test_validation_names_field_and_accepted_values(field, value, pattern):
    config = demo.get_config()
    config.stages = "pretrain,synthesize,sft,kd,eval"
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
    problems = validate_config(config)
    assert any(re.search(pattern, p) for p in problems), problems
    with pytest.raises(ConfigError, match="invalid configuration"):
        run_pipeline(config)


def test_run_py_command_line_reports_bad_override(tmp_path):
    result = subprocess.run([sys.executable, "run.py", "--config=configs/demo.py", "--config.student.dtype=fp8",
                             f"--config.run_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "student.dtype='fp8'" in result.stderr


# The demo with tiny budgets: every stage runs in well under a minute. Dotted keys, as on run.py's command line.
# The models are pretrained from random initialisation (the recipe of configs/demo_models, 1 epoch on 16 problems).
TINY = {"teacher.path": "", "student.path": "", "data.demo_train": 16, "data.demo_held_out": 4,
        "data.demo_pretrain": 0, "pretrain.teacher.epochs": 1, "pretrain.student.epochs": 1,
        "pretrain.teacher.seq_len": 320, "pretrain.teacher.cutoff_len": 320, "pretrain.student.seq_len": 320,
        "pretrain.student.cutoff_len": 320, "sft.epochs": 1, "sft.save_every": 2, "sft.seq_len": 320,
        "sft.cutoff_len": 320, "synthesis.traj_cap": 24, "synthesis.teacher_min_budget": 32, "synthesis.num_slots": 4,
        "synthesis.iterations_per_sync": 4, "eval.max_new_tokens": 16, "stages": "pretrain,synthesize,sft,kd,eval",
        "kd.prompts_per_step": 4, "kd.samples_per_prompt": 2, "kd.max_new_tokens": 8, "kd.seq_len": 160,
        "kd.epochs": 1, "kd.learning_rate": 1e-4}


def _tiny_config(run_dir: Path):
    config = demo.get_config()
    config.run_dir = str(run_dir)
    for key, value in TINY.items():
        section, _, field = key.rpartition(".")
        target = config
        for part in filter(None, section.split(".")):
            target = target[part]
        target[field] = value
    return config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted tiny demo job (in process), shared by the tests below."""
    config = _tiny_config(tmp_path_factory.mktemp("tiny") / "run")
    return run_pipeline(config), Path(config.run_dir)


def test_demo_pipeline_end_to_end_with_tiny_budgets(tiny_run):
    """pretrain -> synthesize (MOTAB and teacher-only) -> sft -> kd -> eval on the generated problems."""
    summaries, run = tiny_run
    assert list(summaries) == ["pretrain", "synthesize", "sft", "kd", "eval"]
    assert summaries["kd"]["steps"] == 4 and (run / "kd" / "hf" / "model.safetensors").exists()
    for policy in ("motab", "teacher_only"):
        lines = (run / f"synthesis_{policy}.jsonl").read_text().splitlines()
        assert len(lines) == 16 and summaries["synthesize"][policy]["records"] == 16
        assert (run / f"sft_{policy}" / "hf" / "model.safetensors").exists()
    assert set(summaries["eval"]) - {"seconds"} == {"student (before)", "teacher", "student after motab SFT",
                                                      "student after teacher_only SFT", "student after on-policy KD"}
    results = (run / "results.md").read_text()
    assert "| teacher |" in results and "| motab | 16 |" in results and "| teacher_only | 16 | - |" in results
    assert "stage sft: finished" in (run / "run.log").read_text()
    # Teacher-only records are all teacher tokens; MOTAB's breach rate is the fraction of records with a breach.
    records = [json.loads(line) for line in (run / "synthesis_motab.jsonl").read_text().splitlines()]
    assert summaries["synthesize"]["motab"]["breach_rate"] == sum(bool(r["breach_step"]) for r in records) / 16


def _outputs(run: Path) -> dict[str, object]:
    """Everything a job produces that must not depend on where it was interrupted."""
    out: dict[str, object] = {}
    for path in sorted(run.glob("synthesis_*.jsonl")) + sorted(run.glob("eval/*/*.samples.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            row.pop("seconds", None)
        out[str(path.relative_to(run))] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))
    for path in sorted(run.glob("*/hf/model.safetensors")) + sorted(run.glob("pretrain/*/hf/model.safetensors")):
        out[str(path.relative_to(run))] = path.read_bytes()
    out["results"] = (run / "results.md").read_text().split("## Stages")[0]
    return out


def _kill_when(command: list[str], run: Path, condition, env: dict[str, str]) -> bool:
    """Start `command`, SIGKILL it as soon as `condition(run)` holds; True if it was killed before finishing."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if condition(run):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.02)
    process.kill()
    process.wait()
    return False


def test_killed_run_resumes_to_the_same_outputs(tiny_run, tmp_path):
    """run.py killed (SIGKILL) mid-synthesis and again mid-SFT, then rerun: the outputs equal an uninterrupted
    run's, byte for byte for the exported models."""
    _, reference = tiny_run
    run = tmp_path / "run"
    command = [sys.executable, "run.py", f"--config.run_dir={run}"] + [f"--config.{k}={v}" for k, v in TINY.items()]
    env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")

    def lines(path: Path) -> int:
        return len(path.read_text().splitlines()) if path.exists() else 0

    assert _kill_when(command, run, lambda r: lines(r / "synthesis_motab.jsonl") >= 2, env)
    assert not (run / "stages" / "synthesize.done").exists()
    assert _kill_when(command, run, lambda r: any((r / "sft_motab" / "checkpoints").glob("*")), env)
    assert not (run / "stages" / "sft.done").exists()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage pretrain: already finished, skipped" in result.stderr
    assert "## Accuracy" in result.stdout
    resumed, uninterrupted = _outputs(run), _outputs(reference)
    assert sorted(resumed) == sorted(uninterrupted)
    for key in uninterrupted:
        assert resumed[key] == uninterrupted[key], key


@pytest.mark.parametrize("name", ["base", "demo", "limo", "acereason", "qwen3_8b_to_1p7b", "qwen3_32b_to_llama3p2_3b"])
def test_shipped_configs_load_and_the_paper_ones_validate(name):
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()
    problems = validate_config(config)
    if name == "base":  # no models named: the error says which fields to set
        assert any("teacher.path is empty" in p for p in problems)
    else:
        assert problems == []


def test_the_shipped_demo_models_are_what_the_pretrain_recipe_makes():
    """configs/demo_models holds the output of `configs/demo.py:pretrain`: the recipe validates, starts from random
    initialisation, and each shipped model has the recipe's architecture (layers, width, vocabulary)."""
    recipe = demo.get_config("pretrain")
    assert validate_config(recipe) == [] and recipe.stages.startswith("pretrain")
    for role, (layers, width, _) in demo.SHAPES.items():
        assert recipe[role].path == "" and demo.get_config()[role].path == str(demo.DEMO_MODELS / role)
        shipped = json.loads((demo.DEMO_MODELS / role / "config.json").read_text())
        assert (shipped["num_hidden_layers"], shipped["hidden_size"], shipped["vocab_size"]) == (
            layers, width, recipe[role].init.vocab_size), role
    with pytest.raises(ValueError, match="accepted variants"):
        demo.get_config("pretrained")


def test_hub_questions_fail_clearly_offline(tmp_path):
    from motab_jax.pipeline.stages import _read_questions

    with pytest.raises(Exception, match="HF_HUB_OFFLINE"):
        _read_questions("hf:GAIR/LIMO-v2@train", 0, "question,solution")


def test_preflight_checks_the_pair_before_loading_weights(tmp_path):
    from motab_jax.pipeline import preflight

    config = demo.get_config()
    assert validate_config(config) == [] and preflight(config) == []
    config.synthesis.entropy_top_k = 1000  # the byte-level vocabulary has 384 ids
    config.synthesis.memory_budget_gb = 1e-4
    problems = preflight(config)
    assert any(re.match(r"synthesis\.entropy_top_k=1000: must be <= the vocabulary \(2\d\d ids\)", p)
               for p in problems), problems
    assert any(p.startswith("memory: stage synthesize needs at least") for p in problems), problems
    config = demo.get_config()
    config.student.path = ""  # a randomly initialised student with a different vocabulary than the teacher's
    config.student.tokenizer = "qwen3"
    config.student.init.vocab_size = 151669
    assert preflight(config) == []  # synthesis runs across vocabularies
    config.stages = "synthesize,sft,kd,eval"
    config.policies = "motab,skd_token"
    problems = preflight(config)
    assert any(p.startswith("stages: 'kd' (on-policy distillation)") and "teacher and student tokenizers differ" in p
               for p in problems), problems
    assert any(p.startswith("policies: 'skd_token'") for p in problems), problems
    config.run_dir = str(tmp_path / "never")
    with pytest.raises(ConfigError, match="needs one vocabulary"):
        run_pipeline(config)
    assert not (tmp_path / "never").exists()  # nothing written before the configuration is known to be valid


def test_a_teacher_with_another_tokenizer_runs_synthesis_sft_and_eval(tmp_path):
    """run.py's job with a Qwen-vocabulary teacher and the byte-level student: records keep teacher text in both
    vocabularies, SFT reads student ids, each model is evaluated with its own tokenizer; a rerun adds nothing."""
    config = _tiny_config(tmp_path / "run")
    config.teacher.tokenizer = "qwen3"
    config.teacher.init.vocab_size = 151669
    config.teacher.init.update(dict(eos_token_ids=(151645,), bos_token_id=None, pad_token_id=151643))
    config.stages, config.policies = "synthesize,sft,eval", "motab"
    config.data.demo_train, config.data.demo_held_out = 6, 2
    config.sft.global_batch_size = 2
    config.synthesis.eps0 = 0.5  # random models: the teacher intervenes
    summaries = run_pipeline(config)
    run = Path(config.run_dir)
    records = [json.loads(line) for line in (run / "synthesis_motab.jsonl").read_text().splitlines()]
    assert len(records) == 6 and summaries["synthesize"]["motab"]["records"] == 6
    teacher_segments = [s for r in records for s in r["segments"] if s["source"] == "teacher"]
    assert teacher_segments and all(max(s["token_ids"], default=0) < 384 for s in teacher_segments)
    assert any(max(s["teacher_token_ids"], default=0) >= 384 for s in teacher_segments)
    assert all(r["teacher_prompt"].startswith("<|im_start|>") for r in records)  # the teacher's own chat template
    assert (run / "sft_motab" / "hf" / "model.safetensors").exists()
    assert {"teacher", "student (before)", "student after motab SFT"} <= set(summaries["eval"])
    # A rerun of the finished job skips every stage; the records are not duplicated.
    run_pipeline(config)
    assert len((run / "synthesis_motab.jsonl").read_text().splitlines()) == 6


def test_single_host_stages_are_refused_across_processes():
    from motab_jax.pipeline.validation import multihost_problems

    config = demo.get_config()
    assert multihost_problems(config, ["models", "pretrain", "sft"], 1) == []
    problems = multihost_problems(config, ["models", "pretrain", "synthesize", "sft", "kd", "eval"], 4)
    assert [p.split("'")[1] for p in problems] == ["models", "pretrain"]
    assert "runs on one host only (4 processes started)" in problems[0]


def test_compare_policies_table_lines_up_policies_and_accuracy(tiny_run):
    from test_compare_policies import load_compare_policies

    module = load_compare_policies()
    summaries, _ = tiny_run
    rows = {line.split(" | ")[0].lstrip("| "): line for line in module.comparison_table(summaries).splitlines()}
    motab = summaries["synthesize"]["motab"]
    assert rows["student after motab SFT"].startswith(f"| student after motab SFT | {motab['breach_rate']:.2f} |")
    assert f"{motab['tokens']['student']:,} / " in rows["student after motab SFT"]
    assert rows["teacher"].startswith("| teacher | - | - | - |")
    accuracy = 100 * summaries["eval"]["student after teacher_only SFT"]["held_out"]["avg@k"]
    assert rows["student after teacher_only SFT"].endswith(f" | {accuracy:.1f} |")
    assert module.ALL_POLICIES.count("skd_step@gamma=") == 5


def test_demo_data_splits_are_disjoint_and_stable(tmp_path):
    from motab_jax.pipeline.demo_data import write_demo_data

    without = write_demo_data(tmp_path / "a", train=30, held_out=10, seed=3)
    with_pretrain = write_demo_data(tmp_path / "b", train=30, held_out=10, seed=3, pretrain=50)
    problems = {name: [json.loads(line)["problem"] for line in path.read_text().splitlines()]
                for name, path in with_pretrain.items()}
    assert [len(problems[n]) for n in ("train", "held_out", "pretrain")] == [30, 10, 50]
    assert len(set().union(*map(set, problems.values()))) == 90  # disjoint
    for name in ("train", "held_out"):  # adding a pretrain split leaves the other two unchanged
        assert without[name].read_text() == with_pretrain[name].read_text()
    assert without["pretrain"].read_text() == without["train"].read_text()


def test_demo_problems_are_day_by_day_running_totals(tmp_path):
    """Every generated solution: one step per day, each `total +/- change = next`, the boxed answer the closed form
    start +/- days * change, every number in 10..99. The student's solution: the same steps, except that a step
    whose units digits overshoot 10 (undershoot 0) by 5 or more is off by exactly the forgotten carry (borrow),
    and the next step starts from that wrong total."""
    import random

    from motab_jax.pipeline.demo_data import make_problem

    rng = random.Random(5)
    slipped_days = set()
    for index in range(300):
        row = make_problem(rng, index)
        match = re.fullmatch(r"\w+ has (\d+) \w+ and (gets|gives away) (\d+) (?:more )?each day\. How many \w+ "
                             r"(?:are left )?after (\d) days\?", row["problem"])
        assert match, row["problem"]
        start, change, days = int(match[1]), int(match[3]), int(match[4])
        sign = 1 if match[2] == "gets" else -1
        steps = row["solution"].split(".\n\n")
        assert 3 <= days <= 6 and len(steps) == days + 1
        op = "+" if sign > 0 else "-"
        for day, step in enumerate(steps[:-1], 1):
            before = start + sign * (day - 1) * change
            assert step == f"Day {day}: {before}{op}{change}={before + sign * change}"
            assert 10 <= before + sign * change <= 99
        assert row["answer"] == str(start + sign * days * change)
        assert steps[-1] == f"The answer is \\boxed{{{row['answer']}}}."
        total = start
        for day, step in enumerate(row["student_solution"].split(".\n\n")[:-1], 1):
            units = total % 10 + sign * change
            forgotten = -10 if units >= 15 else 10 if units <= -5 else 0
            assert step == f"Day {day}: {total}{op}{change}={total + sign * change + forgotten}"
            if forgotten:
                slipped_days.add(day)
            total += sign * change + forgotten
        assert row["student_solution"].endswith(f"The answer is \\boxed{{{total}}}.")
    assert slipped_days == {1, 2, 3, 4, 5, 6}  # the student's first slip can fall on any day


def test_recovery_examples_go_on_from_the_right_total():
    """The demo teacher's recovery rows: the prefix is the solution up to a day k whose result is wrong (checked
    against the step's own arithmetic); the continuation is the correct solution from day k+1 on, so the next step
    starts from the right total, not the one written. The prefix is context (student segment, masked), the
    continuation the target."""
    import random

    from motab_jax.data.formatting import format_example
    from motab_jax.pipeline.demo_data import make_problem, recovery_example
    from motab_jax.pipeline.stages import _recovery_examples
    from motab_jax.text import byte_level_tokenizer

    rng, days_seen, tens = random.Random(7), set(), 0
    for index in range(200):
        solution = make_problem(rng, index)["solution"]
        prefix, rest = recovery_example(solution, rng)
        steps = solution.split(".\n\n")
        done, _, partial = prefix.rpartition(".\n\n")
        wrong_steps = done.split(".\n\n")
        k = len(wrong_steps)
        assert wrong_steps[:-1] == steps[:k - 1]
        day, a, op, c, written = re.fullmatch(r"Day (\d): (\d+)([+-])(\d+)=(\d+)", wrong_steps[-1]).groups()
        right = int(a) + int(c) if op == "+" else int(a) - int(c)
        assert int(day) == k and 10 <= int(written) <= 99 and int(written) != right
        assert f"Day {k}: {a}{op}{c}={right}" == steps[k - 1]
        tens += abs(int(written) - right) == 10
        assert partial == "" and rest == ".\n\n".join(steps[k:])
        days_seen.add(k)
    assert days_seen == {1, 2, 3, 4, 5, 6} and 60 < tens < 160  # any day; the misconception's slip half the time
    rows = [dict(make_problem(rng, i), id=f"p{i}") for i in range(40)]
    examples = _recovery_examples(rows, lambda r: r["problem"], 0.5, 3, ".\n\n")
    assert 10 < len(examples) < 30 and examples == _recovery_examples(rows, lambda r: r["problem"], 0.5, 3, ".\n\n")
    tok = byte_level_tokenizer()
    row = format_example(examples[0], tok, mask_flawed_student_segment=True)
    seg = examples[0].segments
    trained = [int(t) for t, m in zip(row.input_ids, row.loss_mask) if m]
    assert tok.decode(trained[:-1]) == seg[2]["text"] and trained[-1] == tok.eos_token_id
    assert seg[0]["text"] in tok.decode(row.input_ids)  # the wrong day is context


def test_a_recovery_share_outside_0_1_is_refused_by_name():
    from configs import demo

    config = demo.get_config("pretrain")
    assert validate_config(config) == []
    config.pretrain.teacher.recovery = 1.5
    assert validate_config(config) == ["pretrain.teacher.recovery=1.5: must be a share in [0, 1] (of the pretrain "
                                       "problems read once more with one day written wrong)"]


def test_run_py_reports_a_missing_model_in_one_message(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "run.py", "--config.stages=models", f"--config.run_dir={run}",
                             "--config.teacher.path=Qwen/Not-A-Cached-Model"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert ("error: Qwen/Not-A-Cached-Model: not a local folder, not in the hub cache, and HF_HUB_OFFLINE=1"
            in result.stderr)
    assert "Traceback" not in result.stderr
    assert "Traceback" in (run / "run.log").read_text()  # kept for debugging


def test_a_baseline_is_one_override_away():
    from configs import limo
    from motab_jax.pipeline.policy_runs import policy_runs

    config = limo.get_config()
    assert [r.label for r in policy_runs(config)] == ["motab"]
    config.synthesis.policy, config.synthesis.gamma = "skd_step", 0.8  # the override form
    assert validate_config(config) == []
    (run,) = policy_runs(config)
    assert (run.policy, run.stem) == ("skd_step", "skd_step")
    assert run.synthesis_section(config.synthesis.to_dict())["gamma"] == 0.8
    config.synthesis.policy = "best"
    assert any("unknown policy 'best'" in p for p in validate_config(config))
