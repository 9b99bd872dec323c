"""Checking a job's configuration before any heavy work.

`validate_config` checks every field on its own (types, ranges, names, paths) without touching a model.
`preflight` then reads the data inputs (the question file line by line, benchmark files: `pipeline.inputs`) and
only the two models' config.json and tokenizers (local folders, the hub cache, or the hub when it is reachable),
and checks what needs both: one vocabulary where a stage compares the models id by id
(kd, skd_token; synthesis otherwise runs across vocabularies), top-k values within the vocabulary, a memory
estimate of the largest stage against the devices' memory, and (logged) whether the two tokenizers render the
job's first prompts identically (`prompt_check`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from motab_jax.errors import MotabInputError
from motab_jax.eval.benchmarks import BENCHMARKS
from motab_jax.jsonl import read_json
from motab_jax.models.config import ModelConfig, config_from_hf
from motab_jax.models.factory import init_fields, make_tokenizer, spec_tokenizer, validate_model_spec
from motab_jax.models.sharding import MeshConfig
from motab_jax.motab.config import DEFAULTS as SYNTHESIS_DEFAULTS
from motab_jax.motab.config import synthesis_problems
from motab_jax.motab.cross_sizing import RATIO_TEXTS, TokenRatio, measure_token_ratio, ratio_texts
from motab_jax.pipeline.memory import (available_memory, format_bytes, generation_pools, memory_breakdown,
                                      memory_hint, text_path_plan)
from motab_jax.pipeline.multihost import GENERATION_MODES, generation_problems
from motab_jax.pipeline.inputs import input_problems, run_dir_problems
from motab_jax.pipeline.policy_runs import policy_runs
from motab_jax.pipeline.prompt_check import check_prompt_convention
from motab_jax.text.harmony import DEFAULT_REASONING, REASONING_LEVELS, is_harmony_tokenizer
from motab_jax.train.losses import LOSSES
from motab_jax.train.optimizer import optimizer_problems

log = logging.getLogger("motab_jax")

STAGE_NAMES = ("models", "pretrain", "synthesize", "sft", "kd", "eval")
_TRAIN_SECTIONS = ("sft", "kd")


class ConfigError(MotabInputError):
    """The configuration is invalid; the message lists every problem found."""


def stages_of(config: Any) -> list[str]:
    return [s.strip() for s in str(config.stages).split(",") if s.strip()]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _training_problems(section: Any, name: str) -> list[str]:
    problems = [f"{name}.{p}" for p in optimizer_problems(section)]

    def need(ok: bool, field: str, rule: str) -> None:
        if field in section and not ok:
            problems.append(f"{name}.{field}={section[field]!r}: must be {rule}")

    def num(field: str) -> float:
        value = section.get(field, 0)
        return value if _is_number(value) else float("nan")

    for field in ("epochs", "micro_batches", "seq_len", "save_every", "keep_last", "chunk_size",
                  "global_batch_size", "prompts_per_step", "samples_per_prompt", "max_new_tokens"):
        need(isinstance(section.get(field), int) and num(field) >= 1, field, "an integer >= 1")
    if "global_batch_size" in section and _is_number(section.get("micro_batches")) and section.micro_batches >= 1 \
            and section.global_batch_size % section.micro_batches:
        problems.append(f"{name}.micro_batches={section.micro_batches} must divide {name}.global_batch_size="
                        f"{section.global_batch_size}")
    if "cutoff_len" in section:
        need(isinstance(section.cutoff_len, int) and section.cutoff_len >= 0, "cutoff_len", ">= 0 (0 = seq_len)")
    return problems


def _kd_problems(kd: Any, runs: list[str] | None, stages: list[str]) -> list[str]:
    problems = []
    if kd.loss not in LOSSES:
        problems.append(f"kd.loss={kd.loss!r}: accepted {sorted(LOSSES)}")
    if kd.loss == "jsd" and not 0 <= kd.beta <= 1:
        problems.append(f"kd.beta={kd.beta!r}: must be in [0, 1] for jsd")
    if kd.loss in ("akl", "skew_kl", "skew_reverse_kl") and not 0 <= kd.alpha <= 1:
        problems.append(f"kd.alpha={kd.alpha!r}: must be in [0, 1] for {kd.loss}")
    if not 0 <= kd.temperature:
        problems.append(f"kd.temperature={kd.temperature!r}: must be >= 0")
    if not 0 < kd.top_p <= 1:
        problems.append(f"kd.top_p={kd.top_p!r}: must be in (0, 1]")
    if _is_number(kd.seq_len) and _is_number(kd.max_new_tokens) and kd.seq_len <= kd.max_new_tokens:
        problems.append(f"kd.seq_len={kd.seq_len} must exceed kd.max_new_tokens={kd.max_new_tokens} (it holds the "
                        "prompt and the rollout)")
    if kd.from_policy and {"sft", "kd"} <= set(stages) and runs is not None and kd.from_policy not in runs:
        problems.append(f"kd.from_policy={kd.from_policy!r}: not among policies {runs} (or '' for the initial "
                        "student)")
    return problems


def _eval_problems(e: Any, demo: bool) -> list[str]:
    problems = []
    for name in (b.strip() for b in str(e.benchmarks).split(",") if b.strip()):
        if name in BENCHMARKS or name.startswith("hub:") or (name == "demo" and demo):
            continue
        if name == "demo":
            problems.append("eval.benchmarks: 'demo' needs data.questions='demo'")
        elif not Path(name).expanduser().is_file():
            problems.append(f"eval.benchmarks: {name!r} is not a known benchmark ({', '.join(BENCHMARKS)}), "
                            "'hub:<owner>/<dataset>' or an existing JSONL file")
    if not str(e.benchmarks).strip():
        problems.append("eval.benchmarks is empty: give e.g. 'math500,aime24'")
    checks = [("samples", e.samples >= 0, ">= 0 (0 = each benchmark's default)"),
              ("temperature", e.temperature >= 0, ">= 0 (0 = greedy)"), ("top_p", 0 < e.top_p <= 1, "in (0, 1]"),
              ("top_k", e.get("top_k", 0) >= 0, ">= 0 (0 = off)"), ("max_new_tokens", e.max_new_tokens >= 1, ">= 1"),
              ("batch_size", e.batch_size >= 1, ">= 1"), ("limit", e.limit >= 0, ">= 0 (0 = all problems)")]
    problems += [f"eval.{f}={e.get(f)!r}: must be {rule}" for f, ok, rule in checks if not ok]
    return problems


def _data_problems(d: Any, stages: list[str]) -> list[str]:
    problems = []
    questions = str(d.questions)
    needs_questions = bool({"pretrain", "synthesize", "kd"} & set(stages))
    if not questions:
        if needs_questions:
            problems.append("data.questions is empty: give a JSONL file with id and problem, 'hf:<id>[@split]', "
                            "'tfds:<name>' or 'demo'")
    elif questions == "demo":
        if d.demo_train < 1 or d.demo_held_out < 1 or d.demo_pretrain < 0:
            problems.append(f"data.demo_train={d.demo_train}, data.demo_held_out={d.demo_held_out}, "
                            f"data.demo_pretrain={d.demo_pretrain}: must be >= 1, >= 1 and >= 0")
    elif not questions.startswith(("hf:", "tfds:")) and not Path(questions).expanduser().exists():
        problems.append(f"data.questions={questions!r}: no such file (or use 'hf:<id>', 'tfds:<name>', 'demo')")
    if d.question_fields and len(str(d.question_fields).split(",")) != 2:
        problems.append(f"data.question_fields={d.question_fields!r}: give 'question_column,solution_column'")
    if d.limit < 0:
        problems.append(f"data.limit={d.limit}: must be >= 0 (0 = all questions)")
    if "pretrain" in stages and questions != "demo":
        problems.append("stages: 'pretrain' trains the demo's models and needs data.questions='demo'")
    return problems


# Stages that run on one host only: they load and probe (models) or pretrain the demo's models in process.
SINGLE_HOST_STAGES = ("models", "pretrain")


def multihost_problems(config: Any, stages: list[str], process_count: int) -> list[str]:
    """Why `stages` cannot run across `process_count` processes: single-host stages, and the generation stages'
    mode (`pipeline.multihost.generation_problems`) when their mesh cannot run it."""
    mode = str(config.distributed.generation_mode)
    if mode not in GENERATION_MODES:
        return [f"distributed.generation_mode={mode!r}: accepted {', '.join(GENERATION_MODES)}"]
    if process_count == 1:
        return []
    problems = [f"stages: {s!r} runs on one host only ({process_count} processes started); run it on one host "
                "(e.g. --config.stages=models with distributed.num_processes=1), then the other stages across hosts"
                for s in stages if s in SINGLE_HOST_STAGES]
    return problems + generation_problems(config, stages, process_count)


def validate_config(config: Any) -> list[str]:
    """All problems in `config` (empty when valid), each naming the field and the accepted values."""
    problems: list[str] = []
    stages = stages_of(config)
    if not stages:
        problems.append("stages is empty: give a comma-separated list, e.g. 'synthesize,sft,eval'")
    problems += [f"stages: unknown stage {s!r}; accepted: {', '.join(STAGE_NAMES)}" for s in stages
                 if s not in STAGE_NAMES]
    for name in ("teacher", "student"):
        problems += validate_model_spec(config[name], name)
        effort = config[name].get("reasoning_effort", DEFAULT_REASONING)
        if effort not in REASONING_LEVELS:
            problems.append(f"{name}.reasoning_effort={effort!r}: accepted {', '.join(REASONING_LEVELS)} (gpt-oss's "
                            "reasoning level)")
    try:
        MeshConfig(**config.mesh).shape(jax.device_count())
    except (ValueError, TypeError) as e:
        problems.append(f"mesh: {e}")
    if not str(config.run_dir):
        problems.append("run_dir is empty: give a folder for the job's outputs")
    else:
        problems += run_dir_problems(str(config.run_dir))
    runs: list[str] | None = None
    try:
        runs = [r.label for r in policy_runs(config)]
        if str(config.policies).strip() and config.synthesis.policy != SYNTHESIS_DEFAULTS["policy"]:
            problems.append(f"synthesis.policy={config.synthesis.policy!r} is ignored because policies="
                            f"{config.policies!r} names the runs: put it in policies, or set policies=''")
    except ValueError as e:
        problems.append(str(e))
    problems += [f"synthesis.{p}" for p in synthesis_problems(config.synthesis.to_dict())]
    problems += _data_problems(config.data, stages)
    for name in _TRAIN_SECTIONS:
        problems += _training_problems(config[name], name)
    if "pretrain" in stages:
        for role in ("teacher", "student"):
            merged = type(config.sft)(config.sft.to_dict() | config.pretrain[role].to_dict())
            problems += _training_problems(merged, f"pretrain.{role}")
            recovery = config.pretrain[role].get("recovery", 0.0)
            if not _is_number(recovery) or not 0 <= recovery <= 1:
                problems.append(f"pretrain.{role}.recovery={recovery!r}: must be a share in [0, 1] (of the pretrain "
                                "problems read once more with one day written wrong)")
    problems += _kd_problems(config.kd, runs, stages)
    problems += _eval_problems(config.eval, str(config.data.questions) == "demo")
    problems += multihost_problems(config, stages, jax.process_count())
    return problems


# --------------------------------------------------------------------------- preflight: both models


@dataclass(frozen=True)
class ModelFacts:
    role: str
    config: ModelConfig | None  # None: not readable without loading (an unreachable hub id, a .gguf file)
    tokenizer: Any


def _metadata_folder(path: str) -> Path | None:
    """A folder with config.json and the tokenizer files of `path`, without the weights; None if unreachable."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():  # a .gguf file: its metadata comes with the weights
        return None
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "tokenizer*", "*.jinja", "special_tokens_map.json", "generation_config.json",
                "vocab.json", "merges.txt"]
    for local_only in (True, False):
        if not local_only and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            return None
        try:
            return Path(snapshot_download(path, allow_patterns=patterns, local_files_only=local_only))
        except Exception:  # noqa: BLE001 - unreachable or not cached: the models stage reports it when loading
            continue
    return None


def model_facts(spec: Any, role: str) -> ModelFacts:
    if not spec.path:
        return ModelFacts(role, ModelConfig(**init_fields(spec)), spec_tokenizer(make_tokenizer(spec.tokenizer), spec))
    folder = _metadata_folder(str(spec.path))
    if folder is None or not (folder / "config.json").exists():
        return ModelFacts(role, None, None)
    from motab_jax.text import load_tokenizer

    cfg = config_from_hf(read_json(folder / "config.json"), source=str(folder / "config.json"))
    try:
        tokenizer = load_tokenizer(folder)
    except (FileNotFoundError, OSError):
        tokenizer = make_tokenizer(spec.tokenizer) if spec.tokenizer else None
    return ModelFacts(role, cfg, spec_tokenizer(tokenizer, spec))


def reasoning_problems(config: Any, facts: dict[str, ModelFacts]) -> list[str]:
    """A reasoning level set for a model that has none (its tokenizer does not speak harmony) would do nothing."""
    problems = []
    for role, f in facts.items():
        effort = config[role].get("reasoning_effort", DEFAULT_REASONING)
        if f.tokenizer is not None and effort != DEFAULT_REASONING and not is_harmony_tokenizer(f.tokenizer):
            problems.append(f"{role}.reasoning_effort={effort!r}: only gpt-oss (harmony) models have a reasoning "
                            f"level and this {role}'s tokenizer has no harmony format; leave it at "
                            f"{DEFAULT_REASONING!r}")
    return problems


def cross_vocabulary_problems(config: Any, stages: list[str], teacher_tokenizer: Any,
                              student_tokenizer: Any) -> list[str]:
    """A teacher with another tokenizer judges the student's text (synthesis: MOTAB, its ablations, skd_step,
    teacher_only, student_only); what compares the two models token by token needs one vocabulary."""
    from motab_jax.text import check_shared_vocabulary

    try:
        check_shared_vocabulary(teacher_tokenizer, student_tokenizer)
        return []
    except ValueError as e:
        difference = str(e).split(".")[0]
    problems = []
    if "kd" in stages:
        problems.append(f"stages: 'kd' (on-policy distillation) compares the teacher's and the student's next-token "
                        f"distributions id by id, so it needs one vocabulary ({difference}); drop kd from stages or "
                        "use a teacher with the student's tokenizer")
    if "synthesize" in stages:
        for run in policy_runs(config):
            if run.policy == "skd_token":
                problems.append(f"policies: {run.label!r} replaces student tokens outside the teacher's top-k, which "
                                f"has no meaning across vocabularies ({difference}); use motab, its ablations, "
                                "skd_step, teacher_only or student_only with this teacher")
        log.info("preflight: %s: synthesis runs across vocabularies (the teacher scores the student's text)",
                 difference)
    return problems


def preflight(config: Any) -> list[str]:
    """Problems that need both models' metadata (no weights are read), and the data inputs' problems."""
    stages = stages_of(config)
    problems: list[str] = input_problems(config, stages)
    inputs_readable = not problems  # the prompt preview below reads the question file too
    facts = {role: model_facts(config[role], role) for role in ("teacher", "student")}
    unknown = [role for role, f in facts.items() if f.config is None]
    if unknown:
        log.info("preflight: %s not readable before loading (hub unreachable or a .gguf file); the vocabulary "
                 "and memory checks run when the models stage loads them", " and ".join(unknown))
    teacher, student = facts["teacher"], facts["student"]
    problems += reasoning_problems(config, facts)
    ratio = None  # teacher tokens per student token, when synthesis scores text
    if teacher.tokenizer is not None and student.tokenizer is not None and {"synthesize", "kd"} & set(stages):
        problems += cross_vocabulary_problems(config, stages, teacher.tokenizer, student.tokenizer)
        if inputs_readable:
            check_prompt_convention(config, teacher.tokenizer, student.tokenizer)  # logs; never a problem
        if "synthesize" in stages and _text_level(config, teacher.tokenizer, student.tokenizer):
            ratio = _token_ratio(config, teacher.tokenizer, student.tokenizer, inputs_readable)
    vocab = len(student.tokenizer) if student.tokenizer is not None else 0
    for field in ("token_top_k", "entropy_top_k"):
        if vocab and config.synthesis[field] > vocab:
            problems.append(f"synthesis.{field}={config.synthesis[field]}: must be <= the vocabulary ({vocab} ids)")
    if vocab and config.eval.get("top_k", 0) > vocab:
        problems.append(f"eval.top_k={config.eval.top_k}: must be <= the vocabulary ({vocab} ids)")
    if teacher.config is not None and student.config is not None:
        have = float(config.synthesis.memory_budget_gb) * 2**30 or available_memory()
        problems += memory_problems(config, teacher.config, student.config, stages, have, ratio)
    return problems


def _text_level(config: Any, teacher_tokenizer: Any, student_tokenizer: Any) -> bool:
    """Whether synthesis scores text (`motab.cross_engine`): a teacher with another tokenizer, or scoring='text'
    in any run."""
    from motab_jax.text import VocabularyMismatchError, check_shared_vocabulary

    try:
        check_shared_vocabulary(teacher_tokenizer, student_tokenizer)
    except VocabularyMismatchError:
        return True
    try:
        runs = policy_runs(config)
    except ValueError:  # reported by validate_config
        return False
    return any(run.synthesis_section(config.synthesis.to_dict())["scoring"] == "text" for run in runs)


def _token_ratio(config: Any, teacher_tokenizer: Any, student_tokenizer: Any, inputs_readable: bool) -> TokenRatio:
    """The teacher/student token ratio text-level synthesis sizes the teacher's caches for, measured on what the
    engine will measure it on (`cross_sizing.ratio_texts` of the job's questions); logged."""
    questions: list[Any] = []
    d = config.data
    source = str(d.questions)
    n = min(RATIO_TEXTS, d.limit or RATIO_TEXTS)  # the engine reads the first data.limit questions
    if inputs_readable and source == "demo":
        import tempfile

        from motab_jax.jsonl import read_jsonl
        from motab_jax.pipeline.demo_data import write_demo_data

        with tempfile.TemporaryDirectory() as folder:  # the first problems do not depend on the split sizes
            questions = read_jsonl(write_demo_data(folder, train=min(n, d.demo_train), held_out=0,
                                                   seed=config.seed)["train"])
    elif inputs_readable and source and not source.startswith(("hf:", "tfds:")) and not d.question_fields \
            and Path(source).expanduser().is_file():
        from motab_jax.data.questions import read_questions

        questions = read_questions(Path(source).expanduser(), n)
    where, texts = ratio_texts(questions)
    ratio = measure_token_ratio(student_tokenizer, teacher_tokenizer, texts, where)
    log.info("preflight: text-level synthesis: %s", ratio.describe())
    return ratio


def memory_problems(config: Any, teacher: ModelConfig, student: ModelConfig, stages: list[str],
                    have: float, text_ratio: TokenRatio | None = None) -> list[str]:
    """Stages whose least workable peak exceeds `have` bytes (over all devices), with the arithmetic; logs the
    estimate and the KV page pools synthesis and evaluation would get. `text_ratio`: synthesis scores text with
    the teacher's caches sized for that teacher/student token ratio (`motab.cross_sizing`): the slots it runs are
    logged, and not even one is a problem."""
    devices = jax.device_count()
    breakdown = memory_breakdown(config, teacher, student, text_ratio)
    # Only the stages this job runs (a KD estimate at the default 32K-token rollouts is noise in a job without kd).
    summary = ", ".join(f"{k} {format_bytes(sum(v.values()))}" for k, v in breakdown.items() if k in stages)
    log.info("preflight: memory estimate (parameters, caches, optimizer state, activations): %s; available %s over "
             "%d device(s)", summary, format_bytes(have), devices)
    where = (f"memory_budget_gb={config.synthesis.memory_budget_gb:g}" if config.synthesis.memory_budget_gb
             else f"{devices} device(s)")
    text_plan = text_path_plan(config, teacher, student, text_ratio, have) if text_ratio is not None else None
    for stage, pool in generation_pools(config, teacher, student, (have, where)).items():
        if stage == "synthesize" and text_plan is not None:
            if stage in stages and text_plan.slots >= 1:
                log.info("preflight: %s: %s", stage, text_plan.describe())
        elif stage in stages and pool.num_pages >= pool.min_pages:
            log.info("preflight: %s: %s", stage, pool.describe())
    problems = []
    if text_plan is not None and "synthesize" in stages and text_plan.slots < 1:
        problems.append(f"memory: stage synthesize: {text_plan.refusal()}")
    for stage, parts in breakdown.items():
        total = sum(parts.values())
        if stage == "synthesize" and text_plan is not None:
            continue  # the text path's own rule, above
        if stage in stages and have and total > have:
            arithmetic = " + ".join(f"{name}: {format_bytes(value)}" for name, value in parts.items())
            problems.append(
                f"memory: stage {stage} needs at least {format_bytes(total)} ({arithmetic} = {format_bytes(total)}) but "
                f"{format_bytes(have)} are available over {devices} device(s); use more devices, "
                f"{memory_hint(config, stage, parts)}")
    return problems
