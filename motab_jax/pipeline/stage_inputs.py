"""What each stage's outputs were made from, and what a rerun may do with them.

When a stage starts in a run directory it writes `stages/<stage>.inputs.json`: the values of every
configuration field its outputs depend on (dotted paths), its own and those of the earlier stages whose
outputs it read ("covers"). A rerun compares them with its configuration before doing anything:

- equal: the stage is skipped when finished (`stages/<stage>.done`) or resumed where it stopped;
- different: the job is refused, naming each differing field (old -> new), unless the user asks for
  `redo=<stage>` (its outputs, and those of every later stage made from them, are deleted and made again)
  or, for a training stage still in progress whose optimizer settings changed, `amend=<stage>` (it resumes
  from its last good checkpoint with the new settings; the record keeps the history).
A redo never deletes the outputs of a stage whose inputs are unchanged, so rerunning the same command (after a
kill, or after it finished) never throws work away.

Since every recorded stage must agree with the job's configuration, `config.json` (rewritten by each job)
describes the data the directory holds. Fields that say where and in which pieces the same computation runs
are left out (`EXECUTION_FIELDS`): they change memory use or speed and at most floating-point rounding, not
what a stage computes.

A stage reads only finished outputs of earlier stages (`unfinished_inputs`): a stage that needs one that is
missing or unfinished is refused, naming the files that exist so far.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import ml_collections

from motab_jax.errors import MotabInputError
from motab_jax.pipeline.validation import STAGE_NAMES
from motab_jax.text.harmony import DEFAULT_REASONING

log = logging.getLogger("motab_jax")

# Fields that do not change what a stage computes (left out of its recorded inputs):
# - where the job runs and what it logs: run_dir, the compilation cache, the stage list and these two flags;
# - how the devices are used: mesh and distributed (the same program over another layout: round-off only);
# - memory and speed knobs whose equivalence the tests check: attention kernels and rematerialisation
#   (same math), synthesis slots/pages/kernels/sync interval (a trajectory's random keys depend on (seed,
#   question, sample) only, not on its slot or on preemptions: motab_jax/motab/synthesize.py), evaluation
#   batch size (a row's completion does not depend on its batch: motab_jax/motab/generation.py), gradient
#   accumulation and loss chunking (tests/test_train.py: equal to the large batch up to round-off), and how
#   often checkpoints are written and how many are kept (resume is bit-exact).
EXECUTION_FIELDS = frozenset({
    "run_dir", "compilation_cache_dir", "stages", "redo", "amend", "mesh", "distributed",
    "teacher.attention_impl", "teacher.remat", "student.attention_impl", "student.remat",
    "synthesis.num_slots", "synthesis.num_pages", "synthesis.page_size", "synthesis.paged_impl",
    "synthesis.iterations_per_sync", "synthesis.memory_budget_gb", "synthesis.output_path",
    "eval.batch_size"})
# Fields added after run directories were first recorded, with the value their behaviour had before: a record
# without the field matches a configuration that keeps that value (an old run directory is not refused for it).
ADDED_FIELDS = {"teacher.reasoning_effort": DEFAULT_REASONING, "student.reasoning_effort": DEFAULT_REASONING}
TRAINING_EXECUTION_FIELDS = frozenset({"micro_batches", "chunk_size", "save_every", "keep_last"})
# What `amend` may change while a training stage resumes: the optimizer, not the data or the model.
OPTIMIZER_FIELDS = frozenset({"learning_rate", "min_learning_rate", "warmup_ratio", "weight_decay", "beta1", "beta2",
                              "eps", "clip_norm"})
TRAINING_STAGES = ("pretrain", "sft", "kd")

# What each stage writes into the run directory (globs; deleted when the stage is redone). The names are made
# in stages.py / models_stage.py: student_hf, pretrain/<role>, synthesis_<run>.jsonl, sft_<run>, kd, eval.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "models": ("student_hf",), "pretrain": ("pretrain",), "synthesize": ("synthesis_*.jsonl",),
    "sft": ("sft_*",), "kd": ("kd",), "eval": ("eval",)}


class StageInputsChanged(MotabInputError):
    """The run directory holds outputs made with other settings than the job's."""


class UnfinishedInput(MotabInputError):
    """A stage needs the outputs of an earlier stage that has not finished."""


# ------------------------------------------------------------------------------------------------ the graph
def upstream(config: Any, stage: str) -> tuple[str, ...]:
    """The stages whose outputs `stage` reads (directly). pretrain's models replace random initialisations."""
    return {"models": (), "pretrain": (), "synthesize": ("pretrain",), "sft": ("pretrain", "synthesize"),
            "kd": ("pretrain", "sft") if config.kd.from_policy else ("pretrain",),
            "eval": ("pretrain", "sft", "kd")}[stage]


def required_upstream(config: Any, stage: str) -> tuple[str, ...]:
    """The upstream stages `stage` cannot run without (the others it uses when they ran)."""
    return {"sft": ("synthesize",), "kd": ("sft",) if config.kd.from_policy else ()}.get(stage, ())


def all_upstream(config: Any, stage: str) -> set[str]:
    found: set[str] = set()
    todo = list(upstream(config, stage))
    while todo:
        s = todo.pop()
        if s not in found:
            found.add(s)
            todo.extend(upstream(config, s))
    return found


def downstream(config: Any, stage: str) -> list[str]:
    """Every stage made (directly or not) from `stage`'s outputs, in stage order."""
    return [s for s in STAGE_NAMES if stage in all_upstream(config, s)]


# ------------------------------------------------------------------------------------------------ the inputs
def _json(value: Any) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return json.loads(json.dumps(value, sort_keys=True, default=str))  # tuples -> lists, as stored


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out)
    else:
        out[prefix] = _json(value)


def _fields(config: Any, *names: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        target = config
        for part in name.split("."):
            target = target[part]
        _flatten(name, target, out)
    return {k: v for k, v in out.items()
            if k not in EXECUTION_FIELDS and not (k.split(".")[0] in ("sft", "kd", "pretrain")
                                                  and k.rsplit(".", 1)[-1] in TRAINING_EXECUTION_FIELDS)}


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _questions(config: Any) -> dict[str, Any]:
    """The training questions: the fields that name them, and the content of a local file."""
    out = _fields(config, "data.questions", "data.question_fields", "data.limit")
    questions = str(config.data.questions)
    if questions == "demo":
        out.update(_fields(config, "data.demo_train", "data.demo_held_out", "data.demo_pretrain", "seed"))
    elif questions and not questions.startswith(("hf:", "tfds:")) and Path(questions).is_file():
        out["data.questions:sha256"] = _file_digest(Path(questions))  # the same path with other content
    return out


def own_inputs(config: Any, stage: str) -> dict[str, Any]:
    """The configuration fields `stage`'s own work depends on: dotted path -> value (JSON)."""
    models = _fields(config, "teacher", "student")
    if stage == "models":
        return {**models, **_fields(config, "models")}
    if stage == "pretrain":  # each role trains with the sft section updated by pretrain.<role>
        out = {**models, **_fields(config, "data.demo_train", "data.demo_held_out", "data.demo_pretrain", "seed",
                                    "synthesis.instruction")}
        for role in ("teacher", "student"):
            section = ml_collections.ConfigDict(config.sft.to_dict())
            section.update(config.pretrain[role].to_dict())
            out.update(_fields(ml_collections.ConfigDict({"pretrain": {role: section.to_dict()}}), f"pretrain.{role}"))
        return out
    if stage == "synthesize":
        return {**models, **_questions(config), **_fields(config, "synthesis", "policies")}
    if stage == "sft":
        return {**_fields(config, "student", "sft", "data.mask_flawed_student_segment", "policies")}
    if stage == "kd":
        return {**models, **_questions(config), **_fields(config, "kd", "synthesis.instruction",
                                                          "synthesis.prompt_format", "policies")}
    if stage == "eval":
        demo = _fields(config, "data.questions", "data.demo_train", "data.demo_held_out", "seed") \
            if config.data.questions == "demo" else {}  # the "demo" benchmark is the demo's held-out split
        return {**models, **demo, **_fields(config, "eval", "policies")}
    raise ValueError(f"unknown stage {stage!r}")


def inputs_of(config: Any, stages: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in stages:
        out.update(own_inputs(config, stage))
    return out


# ------------------------------------------------------------------------------------------------ records
@dataclasses.dataclass
class StageRecord:
    stage: str
    covers: list[str]  # this stage and the earlier ones whose outputs it read
    inputs: dict[str, Any]
    started: str = ""
    amended: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def record_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "stages" / f"{stage}.inputs.json"


def done_path(run_dir: Path, stage: str) -> Path:
    """Written last (atomically) by the runner when the stage finished; holds its summary."""
    return Path(run_dir) / "stages" / f"{stage}.done"


def is_finished(run_dir: Path, stage: str) -> bool:
    return done_path(run_dir, stage).exists()


def read_record(run_dir: Path, stage: str) -> StageRecord | None:
    path = record_path(run_dir, stage)
    if not path.exists():
        return None
    try:
        return StageRecord(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as e:
        raise MotabInputError(f"{path}: not a stage record ({e}); restore it, or delete it together with the "
                              f"stage's outputs ({', '.join(STAGE_OUTPUTS[stage])}) to redo the stage") from e


def write_record(run_dir: Path, record: StageRecord) -> None:
    path = record_path(run_dir, record.stage)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(record), indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


def _new_record(config: Any, stage: str, records: dict[str, StageRecord]) -> StageRecord:
    """The record of `stage` starting now, given the recorded (finished) stages it may read from."""
    covers = {stage}
    for s in upstream(config, stage):
        if s in records:
            covers.update(records[s].covers)
    order = [s for s in STAGE_NAMES if s in covers]
    return StageRecord(stage, order, inputs_of(config, order), started=time.strftime("%Y-%m-%d %H:%M:%S"))


def read_records(run_dir: Path) -> dict[str, StageRecord]:
    return {s: r for s in STAGE_NAMES if (r := read_record(run_dir, s)) is not None}


def begin_stage(config: Any, run_dir: Path, stage: str, *, write: bool = True) -> StageRecord:
    """The stage's record, written now if it has none (the stage is about to make its first outputs)."""
    record = read_record(run_dir, stage)
    if record is None:
        record = _new_record(config, stage, read_records(run_dir))
        if write:
            write_record(run_dir, record)
    return record


def _changes(record: StageRecord, config: Any) -> dict[str, tuple[Any, Any]]:
    now = inputs_of(config, record.covers)
    missing = object()
    recorded = {k: v for k, v in ADDED_FIELDS.items() if k in now} | record.inputs
    return {k: (record.inputs.get(k, missing), now.get(k, missing)) for k in sorted(set(record.inputs) | set(now))
            if recorded.get(k, missing) != now.get(k, missing)}


def _show(value: Any) -> str:
    return "(absent)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)


def _describe_changes(changes: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
    shown = [f"{k} {_show(old)} -> {_show(new)}" for k, (old, new) in list(changes.items())[:limit]]
    more = f" (and {len(changes) - limit} more)" if len(changes) > limit else ""
    return "; ".join(shown) + more


def _stage_list(value: Any, field: str, allow_all: bool) -> set[str]:
    names = {s.strip() for s in str(value or "").split(",") if s.strip()}
    accepted = (("all",) if allow_all else ()) + STAGE_NAMES
    unknown = sorted(names - set(accepted))
    if unknown:
        raise MotabInputError(f"{field}={value!r}: unknown stage(s) {', '.join(map(repr, unknown))}; accepted: "
                              f"{', '.join(accepted)} (comma-separated)")
    return set(STAGE_NAMES) if "all" in names else names


def _outputs(run_dir: Path, stage: str) -> list[Path]:
    return sorted(p for pattern in STAGE_OUTPUTS[stage] for p in Path(run_dir).glob(pattern))


def _describe_outputs(run_dir: Path, stage: str) -> str:
    found = []
    for path in _outputs(run_dir, stage):
        if path.suffix == ".jsonl":
            records = path.read_bytes().count(b"\n")  # whole lines: JSONL splits on "\n" only
            found.append(f"{path.name} ({records} records)")
        else:
            found.append(f"{path.name}/")
    return ", ".join(found) or "no outputs yet"


def discard_stage(run_dir: Path, stage: str) -> None:
    """Delete a stage's outputs, record and done marker (a redo)."""
    for path in _outputs(run_dir, stage):
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for path in (done_path(run_dir, stage), record_path(run_dir, stage)):
        path.unlink(missing_ok=True)
    log.info("stage %s: outputs discarded, to be made again", stage)


# ------------------------------------------------------------------------------------------------ the checks
def unfinished_inputs(config: Any, run_dir: Path, stage: str, before: Iterable[str] = ()) -> str:
    """What `stage` would read that is not finished ("" when nothing): a required earlier stage that has not
    finished, or any earlier stage that started and did not finish. `before`: stages of this job that run
    first (their outputs will be finished by then)."""
    before = set(before)
    for s in upstream(config, stage):
        if s in before or is_finished(run_dir, s):
            continue
        started = read_record(run_dir, s) is not None or bool(_outputs(run_dir, s))
        if s in required_upstream(config, stage) or started:
            state = "has not finished" if started else "has not run"
            return (f"stage {stage} reads the outputs of stage {s}, which {state} in {run_dir} (no "
                    f"stages/{s}.done; found: {_describe_outputs(run_dir, s)}): add {s} before {stage} in stages "
                    f"(e.g. --config.stages={s},{stage}) to finish it first")
    return ""


@dataclasses.dataclass
class Plan:
    """What a job does to the run directory before its stages run (`check_stages`, then `apply_plan`)."""

    adopt: dict[str, StageRecord]  # finished before stage records existed: recorded with this job's settings
    redo: list[str]  # outputs deleted, to be made again
    amend: dict[str, dict[str, tuple[Any, Any]]]  # training stages continuing with these changes


def check_stages(config: Any, run_dir: Path, job_stages: list[str]) -> Plan:
    """Check every stage recorded in `run_dir` against `config` and decide what `redo` and `amend` do; raise
    `StageInputsChanged`, naming each stage and field, when they disagree otherwise. Reads only."""
    run_dir = Path(run_dir)
    redo = _stage_list(config.get("redo", ""), "redo", allow_all=True)
    amend = _stage_list(config.get("amend", ""), "amend", allow_all=False)
    records = read_records(run_dir)
    adopt = {}
    for stage in STAGE_NAMES:  # directories from before stage records: take the job's settings as theirs
        if stage not in records and is_finished(run_dir, stage):
            records[stage] = adopt[stage] = _new_record(config, stage, records)
    records = {s: records[s] for s in STAGE_NAMES if s in records}
    problems, to_redo, to_amend = [], [], {}
    for stage, record in records.items():
        if stage in to_redo:
            continue
        changes = _changes(record, config)
        # Finished (or started) before an earlier stage this job runs afresh: made without that stage's outputs.
        missed = [s for s in STAGE_NAMES if s in all_upstream(config, stage) and s in job_stages and s not in records]
        if not changes and not missed:
            if stage in redo:
                log.info("stage %s: its inputs are unchanged, so redo keeps its outputs (delete them to make them "
                         "again with the same settings)", stage)
            continue
        state = "finished" if is_finished(run_dir, stage) else "started, not finished"
        if stage in redo:
            to_redo += [stage] + [s for s in downstream(config, stage) if s in records and s not in to_redo]
            continue
        own = own_inputs(config, stage)
        optimizer_only = stage in TRAINING_STAGES and changes and not missed and all(
            k in own and k.rsplit(".", 1)[-1] in OPTIMIZER_FIELDS for k in changes)
        if stage in amend and optimizer_only and state != "finished":
            to_amend[stage] = changes
            continue
        why = (f"it ran before stage(s) {', '.join(missed)}, which this job runs now" if missed
               else _describe_changes(changes))
        fix = f"--config.redo={stage}"
        if optimizer_only and state != "finished":
            fix += f" (start it over) or --config.amend={stage} (continue from its last good checkpoint)"
        if stage in amend and not optimizer_only:
            fix += " (amend continues only a training stage in progress whose optimizer settings changed)"
        later = [s for s in downstream(config, stage) if s in records]
        problems.append(f"stage {stage} ({state}; outputs: {_describe_outputs(run_dir, stage)}): {why}. To redo "
                        f"it{' and ' + ', '.join(later) if later else ''}: {fix}")
    if problems:
        raise StageInputsChanged(
            f"run_dir {run_dir} holds outputs made with other settings than this job's:\n  - " +
            "\n  - ".join(problems) + "\nRerun with the recorded settings (stages/<stage>.inputs.json, config.json), "
            "give another run_dir, or redo/amend as shown.")
    return Plan({s: r for s, r in adopt.items() if s not in to_redo}, to_redo, to_amend)


def apply_plan(config: Any, run_dir: Path, plan: Plan) -> None:
    """Carry out `plan` (on one process of a multi-host job)."""
    for stage, record in plan.adopt.items():
        log.warning("stage %s: finished before motab-jax recorded stage inputs; taking this job's settings as "
                    "its own", stage)
        write_record(run_dir, record)
    for stage in plan.redo:
        discard_stage(run_dir, stage)
    for stage, changes in plan.amend.items():
        record = read_record(run_dir, stage)
        record.amended.append({"at": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "changes": {k: list(v) for k, v in changes.items()}})
        record.inputs = inputs_of(config, record.covers)
        write_record(run_dir, record)
        log.info("stage %s: continues with %s (amend)", stage, _describe_changes(changes))


def check_unfinished(config: Any, run_dir: Path, job_stages: list[str]) -> None:
    """Raise `UnfinishedInput` if a stage of this job would read outputs that will not be finished by then."""
    done_before: list[str] = []
    for stage in job_stages:
        if not is_finished(run_dir, stage):
            missing = unfinished_inputs(config, run_dir, stage, done_before)
            if missing:
                raise UnfinishedInput(missing)
        done_before.append(stage)
