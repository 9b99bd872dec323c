"""Stages of the job: pretrain (demo only), synthesize, sft, eval. Each reads the previous stages'
outputs from the run directory and returns a JSON summary.

Model resolution: a role's `path` when set; otherwise the model the `pretrain` stage wrote into the run
directory; otherwise a random initialisation from the role's `init` fields.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from motab_jax.data import BatchIterator, Example, SFTDataset, build_sft_rows, read_examples
from motab_jax.eval import EvalConfig, evaluate
from motab_jax.eval.grading import GradingPool
from motab_jax.eval.harness import finish_evaluation
from motab_jax.jsonl import merge_shards, read_jsonl
from motab_jax.models.factory import build_model
from motab_jax.models.sharding import SAMPLING_RULES
from motab_jax.motab import synthesize
from motab_jax.motab.synthesize import parse_questions
from motab_jax.pipeline.demo_data import recovery_example, write_demo_data
from motab_jax.pipeline.multihost import (all_gather, drop_private_outputs, generation_mesh, generation_plan,
                                          is_primary, private_output, wait_for_all)
from motab_jax.pipeline.policy_runs import PolicyRun, find_run, policy_runs
from motab_jax.pipeline.stage_inputs import UnfinishedInput, done_path
from motab_jax.pipeline.summary import results_entry
from motab_jax.sampling.generate import default_stop_tokens
from motab_jax.text import VocabularyMismatchError, check_shared_vocabulary
from motab_jax.text.prompts import question_content, question_prompt
from motab_jax.train import OptimizerConfig, RolloutConfig, RolloutSource, StepConfig, TrainConfig, fit
from motab_jax.train.trainer import TrainingDiverged

log = logging.getLogger("motab_jax")


def _spec(config: Any, run_dir: Path, role: str) -> ml_collections.ConfigDict:
    spec = ml_collections.ConfigDict(config[role].to_dict())
    pretrained = run_dir / "pretrain" / role / "hf"
    if not spec.path and (pretrained / "config.json").exists():
        spec.path = str(pretrained)
    return spec


def _demo_files(config: Any, run_dir: Path) -> dict[str, Path]:
    """The demo's data files in run_dir/data, each replaced atomically: every process of a multi-host job writes
    the same files while the others may be reading them."""
    d = config.data
    scratch = run_dir / f"data.process{jax.process_index()}.tmp"
    written = write_demo_data(scratch, d.demo_train, d.demo_held_out, config.seed, d.demo_pretrain)
    (run_dir / "data").mkdir(exist_ok=True)
    paths = {}
    for name, path in written.items():
        paths[name] = run_dir / "data" / path.name
        os.replace(path, paths[name])
    scratch.rmdir()
    return paths


def _questions_file(config: Any, run_dir: Path) -> Path | str:
    if config.data.questions == "demo":
        return _demo_files(config, run_dir)["train"]
    return config.data.questions if str(config.data.questions).startswith(("hf:", "tfds:")) \
        else Path(config.data.questions)


def _read_questions(path: Path | str, limit: int, fields: str = "") -> list[dict[str, str]]:
    """Training questions: a JSONL file with `id` and `problem` (or `question` / `prompt`), or any source
    `motab_jax.data.read_examples` reads (e.g. `hf:GAIR/LIMO-v2@train`) with `fields` = "question,solution"
    naming its question and solution columns."""
    if str(path).startswith(("hf:", "tfds:")) or fields:
        pair = tuple(f.strip() for f in fields.split(",")) if fields else None
        if pair is not None and len(pair) != 2:
            raise ValueError(f"data.question_fields={fields!r}: give two column names, 'question,solution'")
        examples, _ = read_examples(str(path), fields=pair, limit=limit or None)
        return [{"id": e.id, "problem": e.prompt if isinstance(e.prompt, str) else e.prompt[-1]["content"]}
                for e in examples]
    questions = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if not any(k in row for k in ("problem", "question", "prompt")):
                    raise KeyError(f"{path}:{number}: no 'problem', 'question' or 'prompt' field")
                questions.append(row)
    return questions[:limit] if limit else questions


def _train_config(section: Any, max_steps: int = 0) -> TrainConfig:
    optimizer = OptimizerConfig(learning_rate=section.learning_rate, min_learning_rate=section.min_learning_rate,
                                warmup_ratio=section.warmup_ratio, weight_decay=section.weight_decay,
                                beta1=section.beta1, beta2=section.beta2, eps=section.eps, clip_norm=section.clip_norm)
    return TrainConfig(optimizer=optimizer, micro_batches=section.micro_batches, chunk_size=section.chunk_size,
                       save_every=section.save_every, keep_last=section.keep_last, max_steps=max_steps)


@contextlib.contextmanager
def _resume_hint(stage: str, section: str) -> Iterator[None]:
    """A NaN stop, with how to continue in this job: a lower rate, and `amend` (the stage's settings changed)."""
    try:
        yield
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{e}. To continue from there: rerun with a lower --config.{section}.learning_rate "
                               f"and --config.amend={stage}") from e


def _fit_sft(model, tokenizer, examples: list[Example], section: Any, out: Path, mesh: Mesh, *,
             mask_flawed: bool = False, max_steps: int = 0) -> dict[str, Any]:
    rows, stats = build_sft_rows(examples, tokenizer, section.seq_len, mask_flawed_student_segment=mask_flawed,
                                 cutoff_len=section.cutoff_len or None)
    batches = BatchIterator(SFTDataset(rows), section.global_batch_size, seed=section.seed,
                            num_epochs=section.epochs, process_index=jax.process_index(),
                            process_count=jax.process_count())
    _, history = fit(model, batches, _train_config(section, max_steps), out, tokenizer=tokenizer, mesh=mesh)
    losses = [h["loss"] for h in history]
    return {"examples": len(examples), "rows": len(rows), "steps": len(history),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "data": stats.as_dict(), "model": str(out / "hf")}


def run_pretrain_stage(config: Any, run_dir: Path, mesh: Mesh) -> dict[str, Any]:
    """Demo only: train the randomly initialised teacher and student on the demo's solutions; a role whose
    `pretrain.<role>.target` names another field of the rows (the student's `student_solution`: the solutions
    with its misconception, `demo_data`) learns that text instead of `solution`."""
    rows = _read_questions(_demo_files(config, run_dir)["pretrain"], 0)
    summary = {}
    for role in ("teacher", "student"):
        section = ml_collections.ConfigDict(config.sft.to_dict())
        section.update(config.pretrain[role].to_dict())
        target = section.get("target", "solution")
        if target not in rows[0]:
            raise KeyError(f"pretrain.{role}.target={target!r}: the demo's rows have no such field; fields: "
                           f"{sorted(rows[0])}")
        def prompt(row: dict[str, Any]) -> list[dict[str, str]]:
            return [{"role": "user", "content": question_content(row["problem"], config.synthesis.instruction)}]

        examples = [Example(id=r["id"], response=r[target], prompt=prompt(r)) for r in rows]
        examples += _recovery_examples(rows, prompt, float(section.get("recovery", 0.0)), section.seed,
                                       config.synthesis.delimiter)
        model, tokenizer = build_model(config[role], mesh)
        with _resume_hint("pretrain", f"pretrain.{role}"):
            summary[role] = _fit_sft(model, tokenizer, examples, section, run_dir / "pretrain" / role, mesh,
                                     mask_flawed=True)
    return summary


def _recovery_examples(rows: list[dict[str, Any]], prompt: Any, share: float, seed: int,
                       delimiter: str) -> list[Example]:
    """`pretrain.<role>.recovery` = share: that share of the rows (chosen by `seed`) once more, as a solution whose
    day k is wrong (context: a student segment, masked) and the correct rest (trained) (`demo_data.recovery_example`)."""
    rng = random.Random(seed)
    chosen = [r for r in rows if rng.random() < share]
    examples = []
    for r in chosen:
        wrong, rest = recovery_example(r["solution"], rng, delimiter)
        examples.append(Example(id=f"{r['id']}-recovery", response=wrong + rest, prompt=prompt(r), segments=[
            {"source": "student", "text": wrong}, {"source": "revise", "text": ""}, {"source": "teacher", "text": rest}]))
    return examples


def run_synthesize_stage(config: Any, run_dir: Path, mesh: Mesh) -> dict[str, Any]:
    """Every policy run's records in run_dir/synthesis_<run>.jsonl, in canonical order (question, sample index).
    Across hosts (data_parallel, `pipeline.multihost`) each process synthesizes its shard of the trajectories on
    its own devices; process 0 merges the shards once all have finished (the other processes return {})."""
    plan = generation_plan(config)
    mesh = generation_mesh(config, mesh)
    # Decoding stages place weights by the sampling rules (tensor parallel, no sharded contractions).
    teacher, tokenizer = build_model(_spec(config, run_dir, "teacher"), mesh, SAMPLING_RULES)
    student, student_tokenizer = build_model(_spec(config, run_dir, "student"), mesh, SAMPLING_RULES)
    try:  # one vocabulary: prompts rendered by the teacher's tokenizer, as the engine has always done
        check_shared_vocabulary(tokenizer, student_tokenizer)
        teacher_tokenizer = None
    except VocabularyMismatchError:  # the teacher judges the student's text (motab.cross_engine)
        tokenizer, teacher_tokenizer = student_tokenizer, tokenizer
    questions = _read_questions(_questions_file(config, run_dir), config.data.limit, config.data.question_fields)
    runs = policy_runs(config)
    new_records = []
    for run in runs:
        output = run_dir / f"synthesis_{run.stem}.jsonl"
        # One engine over every host: process 0 writes the records, the others a private copy (multihost docs).
        section = dict(run.synthesis_section(config.synthesis.to_dict()),
                       output_path=str(private_output(output) if plan.mode == "global_mesh" else output))
        section["extra_stop_tokens"] = tuple(section["extra_stop_tokens"])
        new_records.append(sum(1 for _ in synthesize(student, teacher, tokenizer, questions, section,
                                                     teacher_tokenizer=teacher_tokenizer, shard=plan.shard)))
    wait_for_all("synthesis: every shard written")  # a host that finished early waits here
    gathered = all_gather("synthesis: new records", new_records)
    # One engine over every host: each process counted the same records.
    new_records = gathered[0] if plan.mode == "global_mesh" else [sum(counts) for counts in zip(*gathered)]
    if not is_primary():
        drop_private_outputs(run_dir)
        return {}
    # Canonical order: the question file's, then sample index (also with one process, whose records are
    # appended as slots finish), so the file depends only on the records.
    position = {q.id: n for n, q in enumerate(parse_questions(questions))}
    samples = int(config.synthesis.samples_per_question)
    summary = {}
    for run, new in zip(runs, new_records):
        path = run_dir / f"synthesis_{run.stem}.jsonl"
        done = merge_shards(path, ("id", "sample_index"), lambda r: (position.get(r["id"], len(position)), str(r["id"]),
                                                                     r["sample_index"]))
        if len(done) != len(position) * samples:
            raise RuntimeError(f"{path}: {len(done)} records after every process finished, expected {len(position)} "
                               f"questions x {samples} samples: a bug; please report it (rerun the same command to "
                               "synthesize what is missing)")
        breached = [r for r in done if r["breach_step"]]
        summary[run.label] = {
            "records": len(done), "new_records": int(new),
            # None for policies that judge no step (teacher_only, student_only, skd_token).
            "breach_rate": len(breached) / max(len(done), 1) if run.judges_steps else None,
            "mean_root_cause_depth": float(np.mean([r["breach_step"] - r["root_step"] for r in breached]))
            if breached else None,
            "tokens": {k: int(sum(r["tokens"][k] for r in done)) for k in ("student", "revise", "teacher")}}
        log.info("synthesis %s: %s", run.label, summary[run.label])
    return summary


def _finished_synthesis(run_dir: Path, run: PolicyRun) -> Path:
    """The records of `run`, once its synthesis finished whole; otherwise what is missing, as an error."""
    path = run_dir / f"synthesis_{run.stem}.jsonl"
    done = done_path(run_dir, "synthesize")
    finished = json.loads(done.read_text()) if done.exists() else {}
    have = len(read_jsonl(path, torn_tail=True)) if path.exists() else None
    if run.label not in finished:
        found = f"{have} records so far" if have is not None else "it does not exist"
        raise UnfinishedInput(f"stage sft reads {path} ({found}), but synthesis of {run.label!r} has not finished "
                              f"({done} {'lists no such run' if done.exists() else 'is missing'}): run the "
                              "synthesize stage first (e.g. --config.stages=synthesize,sft,eval)")
    if have != finished[run.label]["records"]:
        raise UnfinishedInput(f"{path} holds {have} records, but synthesis of {run.label!r} finished with "
                              f"{finished[run.label]['records']}: the file changed after it finished; restore it, "
                              f"or delete it and {done} to synthesize it again")
    return path


def run_sft_stage(config: Any, run_dir: Path, mesh: Mesh) -> dict[str, Any]:
    summary = {}
    runs = policy_runs(config)
    records = {run.label: _finished_synthesis(run_dir, run) for run in runs}  # every input, before any training
    for run in runs:
        model, tokenizer = build_model(_spec(config, run_dir, "student"), mesh)
        examples, _ = read_examples(records[run.label])
        # Records are appended as slots finish, an order that depends on scheduling and on where a killed run
        # resumed; training on a canonical order makes the fine-tuned student depend only on the records.
        examples.sort(key=lambda e: e.id)
        with _resume_hint("sft", "sft"):
            summary[run.label] = _fit_sft(model, tokenizer, examples, config.sft, run_dir / f"sft_{run.stem}", mesh,
                                          mask_flawed=config.data.mask_flawed_student_segment)
    return summary


def run_kd_stage(config: Any, run_dir: Path, mesh: Mesh) -> dict[str, Any]:
    """On-policy distillation (spec section 6) of the student after SFT on `kd.from_policy`'s data."""
    k = config.kd
    teacher, tokenizer = build_model(_spec(config, run_dir, "teacher"), mesh)
    spec = _spec(config, run_dir, "student")
    if k.from_policy:
        sft_model = run_dir / f"sft_{find_run(config, k.from_policy).stem}" / "hf"
        if not (sft_model / "config.json").exists():
            raise FileNotFoundError(f"kd.from_policy={k.from_policy!r} but {sft_model} does not exist: run the "
                                    "sft stage first, or set kd.from_policy='' to distil the initial student")
        spec.path = str(sft_model)
    student, _ = build_model(spec, mesh)
    # Prompted exactly as in synthesis, so the distilled student sees the prompts it was fine-tuned on.
    questions = parse_questions(_read_questions(_questions_file(config, run_dir), config.data.limit,
                                                config.data.question_fields))
    prompts = [question_prompt(tokenizer, q.text, config.synthesis.instruction,
                               prompt_format=config.synthesis.prompt_format)[1] for q in questions]
    source = RolloutSource(student, prompts, default_stop_tokens(student, tokenizer), RolloutConfig(
        prompts_per_step=k.prompts_per_step, samples_per_prompt=k.samples_per_prompt,
        max_new_tokens=k.max_new_tokens, temperature=k.temperature, top_p=k.top_p, seq_len=k.seq_len,
        epochs=k.epochs, seed=k.seed))
    params = tuple((name, float(k[name])) for name in ("beta", "alpha") if k.loss in LOSS_PARAMS.get(name, ()))
    with _resume_hint("kd", "kd"):
        _, history = fit(student, source, _train_config(k), run_dir / "kd", tokenizer=tokenizer, mesh=mesh,
                         teacher=teacher, step_config=StepConfig(loss=k.loss, loss_params=params,
                                                                 chunk_size=k.chunk_size))
    losses = [h["loss"] for h in history]
    return {"steps": len(history), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "model": str(run_dir / "kd" / "hf")}


# Which KD losses take which parameter.
LOSS_PARAMS = {"beta": ("jsd",), "alpha": ("akl", "skew_kl", "skew_reverse_kl")}


def run_eval_stage(config: Any, run_dir: Path, mesh: Mesh) -> dict[str, Any]:
    """Every candidate model on every benchmark (run_dir/eval/<model>/). Across hosts (data_parallel) each process
    samples and grades its shard of the samples on its own devices; process 0 merges them and summarises once
    all have finished (the other processes return {})."""
    plan = generation_plan(config)
    mesh = generation_mesh(config, mesh)
    e = config.eval
    benchmarks = tuple(b.strip() for b in str(e.benchmarks).split(",") if b.strip())
    if config.data.questions == "demo":
        held_out = _demo_files(config, run_dir)["held_out"]
        benchmarks = tuple(str(held_out) if b == "demo" else b for b in benchmarks)
    eval_config = EvalConfig(benchmarks=benchmarks, samples=e.samples, temperature=e.temperature, top_p=e.top_p,
                             top_k=e.top_k, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, limit=e.limit)
    candidates = {"student (before)": _spec(config, run_dir, "student"), "teacher": _spec(config, run_dir, "teacher")}
    trained = {f"student after {run.label} SFT": run_dir / f"sft_{run.stem}" / "hf" for run in policy_runs(config)}
    missing = [f"{name} ({folder})" for name, folder in trained.items() if not (folder / "config.json").exists()]
    if missing:
        log.info("eval: skipped, not trained yet (run the sft stage first): %s", ", ".join(missing))
    trained["student after on-policy KD"] = run_dir / "kd" / "hf"  # optional: evaluated when the kd stage ran
    for name, folder in trained.items():
        if (folder / "config.json").exists():
            candidates[name] = _spec(config, run_dir, "student")
            candidates[name].path = str(folder)
    results, folders = {}, {}
    with GradingPool(num_workers=eval_config.grading_workers, item_timeout=eval_config.item_timeout) as pool:
        for name, spec in candidates.items():
            model, tokenizer = build_model(spec, mesh, SAMPLING_RULES)
            folders[name] = run_dir / "eval" / re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
            # One engine over every host: process 0 writes the samples, the others a private copy (multihost docs).
            output = private_output(folders[name]) if plan.mode == "global_mesh" else folders[name]
            results[name] = evaluate(model, tokenizer, output, eval_config, progress=True, pool=pool,
                                     shard=plan.shard)
    if plan.mode == "global_mesh":
        wait_for_all("eval: every process finished")
        if not is_primary():
            drop_private_outputs(run_dir)
            return {}
    if plan.shard[1] > 1:
        wait_for_all("eval: every shard graded")  # a host that finished early waits here
        if not is_primary():
            return {}
        results = {name: finish_evaluation(folder, eval_config) for name, folder in folders.items()}
    # avg@k and the truncation / length fields per model and benchmark (results.md's tables).
    return {name: {b: results_entry(s) for b, s in r.items()} for name, r in results.items()}
