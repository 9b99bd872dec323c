"""`synthesize`: questions in, one record per (question, sample index) out, streamed as slots finish.

The trajectories (question x sample index) are jobs of the slot engine (`driver.run_engine`): continuous
batching on paged KV caches, a finished slot refilled from the queue at once, admission by free pages and
preemption when the pools run dry. A trajectory's random keys depend on (seed, question, sample index) only,
so its record does not depend on the slot it ran in, on the other trajectories, or on preemptions.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Mapping, Sequence

from tqdm.auto import tqdm

from motab_jax.data.questions import checked_questions
from motab_jax.errors import PromptTooLongError
from motab_jax.jsonl import append_records, shard_path
from motab_jax.models.config import ModelConfig
from motab_jax.models.paged_cache import kv_bytes_per_token
from motab_jax.models.transformer import Decoder
from motab_jax.motab.config import resolve_config
from motab_jax.motab.cross_engine import CrossJob, run_cross_engine
from motab_jax.motab.cross_sizing import ratio_texts
from motab_jax.motab.driver import EngineStats, Job, engine_groups, run_engine
from motab_jax.motab.engine import EngineSpec
from motab_jax.motab.policies import Policy, make_policy
from motab_jax.motab.pool import PoolPlan, activation_margin, loaded_budget, plan_pool, weight_bytes
from motab_jax.motab.records import build_record, read_done
from motab_jax.motab.transition import EngineTables
from motab_jax.sampling.generate import default_stop_tokens
from motab_jax.sampling.rules import make_rule
from motab_jax.sampling.sampler import bucket
from motab_jax.text import VocabularyMismatchError, check_shared_vocabulary, token_bytes_table
from motab_jax.text.harmony import HARMONY_ANALYSIS, is_harmony_tokenizer
from motab_jax.text.incremental import EncoderStats
from motab_jax.text.prompts import question_prompt

log = logging.getLogger("motab_jax")


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    text: str
    prompt_ids: tuple[int, ...] = ()  # an already tokenized prompt (used as is)


def parse_questions(items: Sequence[Any]) -> list[Question]:
    """Questions given as strings or dicts (id + problem / question / prompt, or prompt_ids), checked as the
    question file is (`motab_jax.data.questions`): `InvalidRecordError` naming the question and field."""
    return [Question(qid, text, ids) for qid, text, ids in checked_questions(items)]


def engine_spec(cfg: Mapping[str, Any]) -> EngineSpec:
    policy = cfg["policy"]
    if not isinstance(policy, Policy):
        policy = make_policy(policy, eps0=cfg["eps0"], theta=cfg["theta"], gamma=cfg["gamma"],
                             token_top_k=cfg["token_top_k"])
    rules = {"student_rule": make_rule(cfg["temperature"], cfg["top_p"]),
             "teacher_rule": make_rule(cfg["teacher_temperature"], cfg["top_p"]),
             "draft_rule": make_rule(cfg["draft_temperature"], cfg["top_p"])}
    return EngineSpec.from_config(policy, rules, cfg)


def cache_length(cfg: Mapping[str, Any]) -> int:
    """Context positions a slot can address: prompt + max(trajectory, safe prefix + teacher budget) + one chunk."""
    return bucket(cfg["max_prompt_len"]) + cfg["traj_cap"] + cfg["teacher_min_budget"] + cfg["draft_len"] + 2


def kv_token_bytes(models: Sequence[ModelConfig]) -> int:
    """KV bytes of one position over the pools of `models` (each in its compute dtype)."""
    return sum(kv_bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, c.compute_dtype) for c in models)


def synthesis_pool(cfg: Mapping[str, Any], student: ModelConfig, teacher: ModelConfig, *, uses_teacher: bool = True,
                   weight_bytes: float = 0.0, device_bytes: tuple[float, str] | None = None,
                   groups: int = 1) -> PoolPlan:
    """The page pools synthesis with `cfg` gets over `groups` engine groups (`pool.plan_pool`); also what the
    preflight checks."""
    models = [student, teacher] if uses_teacher else [student]
    margin = activation_margin(cfg["num_slots"], cfg["draft_len"] + 1, max(c.output_vocab_size for c in models))
    return plan_pool(num_slots=cfg["num_slots"], page_size=cfg["page_size"], max_len=cache_length(cfg),
                     max_prompt_len=cfg["max_prompt_len"], token_bytes=kv_token_bytes(models),
                     num_pages=cfg["num_pages"], memory_budget_gb=cfg["memory_budget_gb"], weight_bytes=weight_bytes,
                     margin_bytes=margin, device_bytes=device_bytes, groups=groups)


def _encode(tokenizer: Any, question: Question, cfg: Mapping[str, Any]) -> tuple[str, list[int]]:
    if question.prompt_ids:
        return tokenizer.decode(list(question.prompt_ids)), list(question.prompt_ids)
    return question_prompt(tokenizer, question.text, cfg["instruction"], prompt_format=cfg["prompt_format"])


def synthesize(student: Decoder, teacher: Decoder, tokenizer: Any, questions: Sequence[Any],
               config: Mapping[str, Any] | None = None, *, progress: bool = True,
               stats: EngineStats | None = None, teacher_tokenizer: Any = None,
               shard: tuple[int, int] = (0, 1)) -> Iterator[dict[str, Any]]:
    """Yield one record per (question, sample index) as trajectories finish (see records.build_record).

    `config` is the synthesis section (see `motab_jax.motab.config.SynthesisConfig`); its `policy` is a name or a
    `Policy` object. Questions are strings or dicts with an `id` and a `problem` / `question` / `prompt`
    (formatted per `prompt_format`) or `prompt_ids` (used as is). With `output_path`, records are appended to
    that JSONL file as they finish and pairs already present there are skipped (resume). `stats`: filled with
    the engine's counters (syncs, prefills, preemptions, the pool).

    `teacher_tokenizer`: the teacher's, when it differs from the student's (`tokenizer`): the teacher then judges
    the student's text (`cross_engine`); records keep teacher text in both vocabularies (`cross_records`).

    `shard` = (index, count): run only the trajectories n = question position x samples_per_question + sample
    index with n % count == index (one process of a data-parallel multi-host job, `pipeline.multihost`), appending
    to `jsonl.shard_path(output_path, index, count)`; pairs already in `output_path` or in that shard are skipped.
    Random keys still come from (seed, question position, sample index), so a record does not depend on the shard.
    """
    cfg = resolve_config(config)
    spec = engine_spec(cfg)
    if tokenizer is None:
        raise ValueError("synthesis needs the student's tokenizer")
    text_level = cfg["scoring"] == "text" or _cross_vocabulary(tokenizer, teacher_tokenizer)
    if not text_level and (cfg["first_token_unscored"] or cfg["entropy_zero"]):
        raise ValueError("first_token_unscored / entropy_zero reproduce the released code's text-level scoring: set "
                         "scoring='text' (or use a teacher with another tokenizer)")
    if text_level:
        return _synthesize_cross(spec, cfg, student, teacher, tokenizer, teacher_tokenizer or tokenizer, questions,
                                 progress, stats, shard)
    if student.config.output_vocab_size != teacher.config.output_vocab_size:
        raise ValueError(f"student logits cover {student.config.output_vocab_size} ids but the teacher's cover "
                         f"{teacher.config.output_vocab_size}: pass the teacher's tokenizer (teacher_tokenizer=) for "
                         "a teacher with another vocabulary")
    items = parse_questions(questions)
    queue, encoded = _pending(items, tokenizer, cfg, shard)
    weights, groups = weight_bytes(student, teacher), engine_groups(student)
    pool = synthesis_pool(cfg, student.config, teacher.config, uses_teacher=spec.uses_teacher, weight_bytes=weights,
                          device_bytes=loaded_budget(weights, groups), groups=groups)
    records = _run(spec, cfg, pool, student, teacher, tokenizer, items, queue, encoded, progress, stats)
    return _append(cfg, records, shard)


def _append(cfg: Mapping[str, Any], records: Iterator[dict[str, Any]], shard: tuple[int, int]
            ) -> Iterator[dict[str, Any]]:
    return append_records(shard_path(cfg["output_path"], *shard), records) if cfg["output_path"] else records


def _pending(items: list[Question], tokenizer: Any, cfg: Mapping[str, Any], shard: tuple[int, int] = (0, 1)
             ) -> tuple[list[tuple[int, int]], dict[int, tuple[str, list[int]]]]:
    """The (question, sample index) pairs of `shard` not yet in `output_path` or the shard's file (resume), and the
    prompt (text, ids) of each of their questions, every one within max_prompt_len."""
    done: set[tuple[str, int]] = set()
    if cfg["output_path"]:
        done = read_done(cfg["output_path"]) | (read_done(shard_path(cfg["output_path"], *shard)) if shard[1] > 1
                                                else set())
    samples, (index, count) = cfg["samples_per_question"], shard
    queue = [(qi, r) for qi, q in enumerate(items) for r in range(samples)
             if (qi * samples + r) % count == index and (q.id, r) not in done]
    encoded = {qi: _encode(tokenizer, items[qi], cfg) for qi in sorted({qi for qi, _ in queue})}
    for qi, (_, ids) in encoded.items():
        if len(ids) > cfg["max_prompt_len"]:
            given = "prompt_ids has" if items[qi].prompt_ids else "prompt has"
            raise PromptTooLongError(f"question {items[qi].id!r}: {given} {len(ids)} tokens > max_prompt_len="
                                     f"{cfg['max_prompt_len']}; raise max_prompt_len or shorten the question")
    return queue, encoded


def _stop_tokens(student: Decoder, tokenizer: Any, cfg: Mapping[str, Any]) -> list[int]:
    """What ends a student trajectory: the model's and tokenizer's end-of-sequence ids and `extra_stop_tokens`."""
    return sorted(set(default_stop_tokens(student, tokenizer)) | {int(t) for t in cfg["extra_stop_tokens"]})


def _cross_vocabulary(tokenizer: Any, teacher_tokenizer: Any) -> bool:
    if teacher_tokenizer is None or teacher_tokenizer is tokenizer:
        return False
    try:
        check_shared_vocabulary(teacher_tokenizer, tokenizer)
    except VocabularyMismatchError:
        return True
    return False


def _synthesize_cross(spec: EngineSpec, cfg: Mapping[str, Any], student: Decoder, teacher: Decoder, tokenizer: Any,
                      teacher_tokenizer: Any, questions: Sequence[Any], progress: bool,
                      stats: EngineStats | None, shard: tuple[int, int]) -> Iterator[dict[str, Any]]:
    if spec.policy.token_top_k:
        raise ValueError(f"policy={spec.policy.name!r} compares the student's tokens with the teacher's top-k, which "
                         "has no meaning across vocabularies; use motab, its ablations, skd_step, teacher_only or "
                         "student_only with this teacher")
    items = parse_questions(questions)
    samples = cfg["samples_per_question"]
    queue, encoded = _pending(items, tokenizer, cfg, shard)
    prompts = {}
    for qi, (text, ids) in encoded.items():
        if items[qi].prompt_ids:
            raise ValueError(f"question {items[qi].id}: prompt_ids are in one vocabulary; a teacher with another "
                             "tokenizer needs the question as text")
        teacher_format = cfg["teacher_prompt_format"] or cfg["prompt_format"]
        teacher_text, _ = question_prompt(teacher_tokenizer, items[qi].text, cfg["instruction"],
                                          prompt_format=teacher_format)
        if teacher_format == "chat" and is_harmony_tokenizer(teacher_tokenizer):
            # gpt-oss reads the student's solution as its own reasoning (the analysis channel) and continues it.
            teacher_text += HARMONY_ANALYSIS
        prompts[qi] = (text, ids, teacher_text)
    jobs = [CrossJob(n, prompts[qi][1], prompts[qi][2], qi * samples + r) for n, (qi, r) in enumerate(queue)]
    student_eos = _stop_tokens(student, tokenizer, cfg)
    teacher_eos = default_stop_tokens(teacher, teacher_tokenizer)
    bar = tqdm(total=len(jobs), desc=f"synthesis ({spec.policy.name}, text-level scoring)", unit="traj",
               disable=not progress)
    encoding = EncoderStats()
    if stats is not None:
        stats.encoding = encoding

    def records() -> Iterator[dict[str, Any]]:
        try:
            for job, fields in run_cross_engine(spec, student, teacher, tokenizer, teacher_tokenizer, jobs, cfg,
                                                student_eos=student_eos, teacher_eos=teacher_eos, stats=encoding,
                                                ratio_sample=ratio_texts(questions), counters=stats):
                qi, r = queue[job.index]
                bar.update(1)
                yield {"id": items[qi].id, "sample_index": r, "prompt": prompts[qi][0], "policy": spec.policy.name,
                       **fields}
        finally:
            bar.close()

    return _append(cfg, records(), shard)


def _run(spec: EngineSpec, cfg: Mapping[str, Any], pool: PoolPlan, student: Decoder, teacher: Decoder, tokenizer: Any,
         items: list[Question], queue: list[tuple[int, int]], encoded: dict[int, tuple[str, list[int]]],
         progress: bool, stats: EngineStats | None) -> Iterator[dict[str, Any]]:
    tables = EngineTables.build(token_bytes_table(tokenizer), student.config.output_vocab_size, cfg["delimiter"],
                                _stop_tokens(student, tokenizer, cfg))
    samples = cfg["samples_per_question"]
    # Keys depend on the trajectory (question, sample index), not on its slot.
    jobs = [Job(n, tuple(encoded[qi][1]), qi * samples + r) for n, (qi, r) in enumerate(queue)]
    bar = tqdm(total=len(jobs), desc=f"synthesis ({spec.policy.name})", unit="traj", disable=not progress)
    try:
        for job, row in run_engine(spec, student, teacher, tables, jobs, pool=pool, paged_impl=cfg["paged_impl"],
                                   iterations_per_sync=cfg["iterations_per_sync"], seed=cfg["seed"], stats=stats):
            qi, r = queue[job.index]
            bar.update(1)
            yield build_record(tokenizer, row, question_id=items[qi].id, sample_index=r, prompt=encoded[qi][0],
                               policy_name=spec.policy.name, stitched=spec.policy.stitch, revise=cfg["revise"])
    finally:
        bar.close()
