"""`synthesize`: questions in, one record per (question, sample index) out, streamed as slots finish.

The host keeps a queue of pending trajectories and B device slots. It runs the jitted loop until some
slot finishes, reads those slots' records, and refills them from the queue (a masked prefill that leaves
the other slots' contexts intact, with the same compiled shapes), until the queue is empty and every slot
is done.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from motab_jax.jsonl import append_records
from motab_jax.models.config import ModelConfig
from motab_jax.models.kv_cache import CACHE_AXES, KVCache
from motab_jax.models.paged_cache import kv_bytes_per_token
from motab_jax.models.sharding import shard_array
from motab_jax.models.transformer import Decoder
from motab_jax.motab.delimiter import build_delimiter_tables
from motab_jax.motab.engine import EngineSpec, EngineTables, refill, run_iterations
from motab_jax.motab.policies import Policy, make_policy
from motab_jax.motab.records import build_record, read_done
from motab_jax.motab.state import DONE, EngineState, empty_state
from motab_jax.sampling.generate import default_stop_tokens
from motab_jax.sampling.rules import make_rule
from motab_jax.sampling.sampler import bucket
from motab_jax.text import token_bytes_table
from motab_jax.text.prompts import question_prompt

log = logging.getLogger("motab_jax")

DEFAULTS: dict[str, Any] = dict(
    policy="motab", eps0=0.2, theta=1.0, gamma=0.9, token_top_k=25, entropy_top_k=20, draft_len=8, num_slots=8,
    step_cap=8192, traj_cap=32768, teacher_min_budget=256, max_steps=512, max_prompt_len=2048,
    delimiter=".\n\n", revise="However,", samples_per_question=5, temperature=0.6, teacher_temperature=0.6,
    top_p=1.0, draft_temperature=0.6, seed=0, prompt_format="chat",
    instruction="Please reason step by step, and put your final answer within \\boxed{}.",
    iterations_per_sync=64, output_path="", memory_budget_gb=0.0, extra_stop_tokens=())


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    text: str
    prompt_ids: tuple[int, ...] = ()  # an already tokenized prompt (used as is)


def parse_questions(items: Sequence[Any]) -> list[Question]:
    """Questions given as strings or dicts (id + problem / question / prompt, or prompt_ids)."""
    out = []
    for n, item in enumerate(items):
        if isinstance(item, str):
            out.append(Question(str(n), item))
            continue
        text = item.get("problem", item.get("question", item.get("prompt")))
        ids = tuple(int(t) for t in item.get("prompt_ids", ()))
        if text is None and not ids:
            raise KeyError(f"question {n}: no 'problem', 'question', 'prompt' or 'prompt_ids' field "
                           f"(fields: {sorted(item)})")
        out.append(Question(str(item.get("id", n)), str(text or ""), ids))
    ids = [q.id for q in out]
    if len(set(ids)) != len(ids):
        raise ValueError("question ids are not unique; resume and records need unique ids")
    return out


def synthesis_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Every invalid value in a synthesis section (field names as in DEFAULTS), with the accepted range."""
    problems = [f"unknown field {k!r}; accepted: {sorted(DEFAULTS)}" for k in sorted(set(cfg) - set(DEFAULTS))]

    def need(ok: bool, field: str, rule: str) -> None:
        if field in cfg and not ok:
            problems.append(f"{field}={cfg[field]!r}: must be {rule}")

    def number(field: str) -> float:
        value = cfg.get(field, DEFAULTS[field])
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")

    need(0 < number("eps0") <= 1, "eps0", "in (0, 1] (the paper: 0.2; useful 0.1-0.5)")
    need(number("theta") >= 0, "theta", ">= 0 (0 = a fixed boundary eps0; the paper: 1.0)")
    need(number("gamma") > 0, "gamma", "> 0 (SKD step-level; the paper sweeps 0.6-1.0)")
    for field in ("token_top_k", "entropy_top_k", "draft_len", "num_slots", "step_cap", "traj_cap",
                  "teacher_min_budget", "max_steps", "max_prompt_len", "samples_per_question", "iterations_per_sync"):
        need(isinstance(cfg.get(field), int) and number(field) >= 1, field, "an integer >= 1")
    for field in ("temperature", "teacher_temperature", "draft_temperature"):
        need(number(field) >= 0, field, ">= 0 (0 = greedy)")
    need(0 < number("top_p") <= 1, "top_p", "in (0, 1]")
    need(number("memory_budget_gb") >= 0, "memory_budget_gb", ">= 0 (0 = the devices' memory)")
    need(bool(cfg.get("delimiter")), "delimiter", "a non-empty string (the paper: '.\\n\\n')")
    need(cfg.get("prompt_format", "chat") in ("chat", "raw"), "prompt_format", "'chat' or 'raw'")
    return problems


def resolve_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    cfg = dict(DEFAULTS)
    cfg.update(config or {})
    problems = synthesis_problems(cfg)
    if problems:
        raise ValueError("invalid synthesis configuration: " + "; ".join(problems))
    return cfg


def engine_spec(cfg: Mapping[str, Any]) -> EngineSpec:
    policy = cfg["policy"]
    if not isinstance(policy, Policy):
        policy = make_policy(policy, eps0=cfg["eps0"], theta=cfg["theta"], gamma=cfg["gamma"],
                             token_top_k=cfg["token_top_k"])
    return EngineSpec(policy=policy, student_rule=make_rule(cfg["temperature"], cfg["top_p"]),
                      teacher_rule=make_rule(cfg["teacher_temperature"], cfg["top_p"]),
                      draft_rule=make_rule(cfg["draft_temperature"], cfg["top_p"]), draft_len=cfg["draft_len"],
                      entropy_top_k=cfg["entropy_top_k"], step_cap=cfg["step_cap"], traj_cap=cfg["traj_cap"],
                      teacher_min_budget=cfg["teacher_min_budget"], max_steps=cfg["max_steps"])


def cache_length(cfg: Mapping[str, Any]) -> int:
    """Context positions a slot can need: prompt + max(trajectory, safe prefix + teacher budget) + one chunk."""
    return (bucket(cfg["max_prompt_len"]) + cfg["traj_cap"] + cfg["teacher_min_budget"] + cfg["draft_len"] + 2)


def cache_bytes_per_slot(model: ModelConfig, length: int, dtype: Any) -> int:
    """Bytes of one slot's dense KV cache: keys and values of every layer over `length` positions."""
    return length * kv_bytes_per_token(model.num_layers, model.num_kv_heads, model.head_dim, dtype)


def check_memory(cfg: Mapping[str, Any], student: Decoder, teacher: Decoder) -> None:
    """Raise before compiling when the caches cannot fit `memory_budget_gb` (0: the first device's memory)."""
    length = cache_length(cfg)
    lines, total = [], 0
    for name, model in (("student", student), ("teacher", teacher)):
        c = model.config
        per_slot = cache_bytes_per_slot(c, length, c.compute_dtype)
        total += per_slot * cfg["num_slots"]
        lines.append(f"{name}: 2 x {c.num_layers} layers x {length} positions x {c.num_kv_heads} kv heads x "
                     f"{c.head_dim} x {jnp.dtype(c.compute_dtype).itemsize} B = {per_slot / 2**20:.1f} MiB per slot")
    budget = cfg["memory_budget_gb"] * 2**30
    if not budget:
        stats = jax.devices()[0].memory_stats() or {}
        budget = stats.get("bytes_limit", 0) * jax.device_count()
    if budget and total > budget:
        raise MemoryError("KV caches need {:.2f} GiB for {} slots but {:.2f} GiB are available:\n  {}\nlower "
                          "num_slots, traj_cap or max_prompt_len, or shard over more devices".format(
                              total / 2**30, cfg["num_slots"], budget / 2**30, "\n  ".join(lines)))


def _encode(tokenizer: Any, question: Question, cfg: Mapping[str, Any]) -> tuple[str, list[int]]:
    if question.prompt_ids:
        return tokenizer.decode(list(question.prompt_ids)), list(question.prompt_ids)
    text, ids = question_prompt(tokenizer, question.text, cfg["instruction"], prompt_format=cfg["prompt_format"])
    if len(ids) > cfg["max_prompt_len"]:
        raise ValueError(f"question {question.id}: prompt has {len(ids)} tokens > max_prompt_len="
                         f"{cfg['max_prompt_len']}; raise max_prompt_len or shorten the question")
    return text, ids


def synthesize(student: Decoder, teacher: Decoder, tokenizer: Any, questions: Sequence[Any],
               config: Mapping[str, Any] | None = None, *, progress: bool = True) -> Iterator[dict[str, Any]]:
    """Yield one record per (question, sample index) as trajectories finish (see records.build_record).

    `config` is the synthesis section (see DEFAULTS); its `policy` is a name or a `Policy` object. Questions
    are strings or dicts with an `id` and a `problem` / `question` / `prompt` (formatted per `prompt_format`)
    or `prompt_ids` (used as is). With `output_path`, records are appended to that JSONL file as they finish
    and pairs already present there are skipped (resume).
    """
    cfg = resolve_config(config)
    spec = engine_spec(cfg)
    if student.config.output_vocab_size != teacher.config.output_vocab_size:
        raise ValueError(f"student logits cover {student.config.output_vocab_size} ids but the teacher's cover "
                         f"{teacher.config.output_vocab_size}: the models must share one vocabulary")
    if tokenizer is None:
        raise ValueError("synthesis needs the (shared) tokenizer")
    items = parse_questions(questions)
    done = read_done(cfg["output_path"]) if cfg["output_path"] else set()
    queue = [(qi, r) for qi, q in enumerate(items) for r in range(cfg["samples_per_question"])
             if (q.id, r) not in done]
    encoded = {qi: _encode(tokenizer, items[qi], cfg) for qi in sorted({qi for qi, _ in queue})}
    check_memory(cfg, student, teacher)
    records = _run(spec, cfg, student, teacher, tokenizer, items, queue, encoded, progress)
    return append_records(cfg["output_path"], records) if cfg["output_path"] else records


def _place(state: EngineState, param_sharding: Any) -> EngineState:
    """On a mesh: caches sharded by the logical rules (slots over data, KV heads over tensor), the small
    per-slot arrays replicated. Off a mesh the state stays where it was created."""
    if not isinstance(param_sharding, NamedSharding):
        return state
    mesh = param_sharding.mesh

    def cache(c: KVCache) -> KVCache:
        return KVCache(shard_array(c.keys, mesh, CACHE_AXES), shard_array(c.values, mesh, CACHE_AXES),
                       jax.device_put(c.lengths, NamedSharding(mesh, PartitionSpec())))

    rest = dataclasses.replace(state, student_cache=None, teacher_cache=None)
    rest = jax.device_put(rest, NamedSharding(mesh, PartitionSpec()))
    return dataclasses.replace(rest, student_cache=cache(state.student_cache), teacher_cache=cache(state.teacher_cache))


def _run(spec: EngineSpec, cfg: Mapping[str, Any], student: Decoder, teacher: Decoder, tokenizer: Any,
         items: list[Question], queue: list[tuple[int, int]], encoded: dict[int, tuple[str, list[int]]],
         progress: bool) -> Iterator[dict[str, Any]]:
    vocab = student.config.output_vocab_size
    table = token_bytes_table(tokenizer)[:vocab]
    delim = build_delimiter_tables(table + [b""] * (vocab - len(table)), cfg["delimiter"])
    eos = sorted(set(default_stop_tokens(student, tokenizer)) | {int(t) for t in cfg["extra_stop_tokens"]})
    tables = EngineTables(jnp.asarray(delim.next_state), jnp.asarray(delim.completes), jnp.asarray(eos, jnp.int32))
    b, length = cfg["num_slots"], cache_length(cfg)
    student_def, student_params = nnx.split(student)
    teacher_def, teacher_params = nnx.split(teacher)
    state = empty_state(b, spec.out_cap, spec.max_steps, student.init_cache(b, length),
                        teacher.init_cache(b, length if spec.policy.needs_teacher else 1))
    state = _place(state, jax.tree.leaves(student_params)[0].sharding)
    prompt_width = bucket(max((len(ids) for _, ids in encoded.values()), default=1))
    base_key = jax.random.key(cfg["seed"])
    samples = cfg["samples_per_question"]
    slot_job: list[tuple[int, int] | None] = [None] * b
    pending = list(queue)
    bar = tqdm(total=len(queue), desc=f"synthesis ({spec.policy.name})", unit="traj", disable=not progress)
    release = np.zeros(b, bool)
    try:
        while True:
            start = np.zeros(b, bool)
            prompts = np.zeros((b, prompt_width), np.int32)
            lens = np.ones(b, np.int32)
            ids = np.zeros(b, np.uint32)
            for slot in range(b):
                if (slot_job[slot] is None or release[slot]) and pending:
                    qi, r = pending.pop(0)
                    slot_job[slot] = (qi, r)
                    tokens = encoded[qi][1]
                    prompts[slot, :len(tokens)] = tokens
                    lens[slot] = len(tokens)
                    ids[slot] = qi * samples + r  # keys depend on the trajectory, not on its slot
                    start[slot] = True
                elif release[slot]:
                    slot_job[slot] = None
            keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(jnp.asarray(ids))
            state = refill(spec, student_def, teacher_def, student_params, teacher_params, state,
                           jnp.asarray(release), jnp.asarray(start), jnp.asarray(prompts), jnp.asarray(lens), keys)
            if all(job is None for job in slot_job):
                return
            state, _ = run_iterations(spec, student_def, teacher_def, student_params, teacher_params, tables, state,
                                      jnp.asarray(cfg["iterations_per_sync"], jnp.int32))
            finished = np.asarray(state.active & (state.mode == DONE))
            release = finished
            if not finished.any():
                continue
            host = {name: np.asarray(getattr(state, name)) for name in (
                "out_tokens", "out_src", "out_len", "explore_len", "num_steps", "step_start", "step_value", "step_eps",
                "step_h", "breach_step", "root_step", "safe_len", "interventions", "finish", "drafted",
                "accepted_drafts", "teacher_forwards")}
            for slot in np.flatnonzero(finished):
                qi, r = slot_job[slot]
                row = {name: values[slot] for name, values in host.items()}
                bar.update(1)
                yield build_record(tokenizer, row, question_id=items[qi].id, sample_index=r,
                                   prompt=encoded[qi][0], policy_name=spec.policy.name, stitched=spec.policy.stitch,
                                   revise=cfg["revise"])
    finally:
        bar.close()
