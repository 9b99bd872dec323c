"""The synthesis section's knobs: the one place a synthesis knob is declared.

Each field of `SynthesisConfig` carries its default, its accepted range (a predicate and the text that names
it), whether a `policies` entry may override it ("motab@eps0=0.3"), and a one-line doc. Everything else is
derived from those declarations: `DEFAULTS` (configs/base.py builds `config.synthesis` from it),
`OVERRIDABLE`, `synthesis_problems` (validation), `resolve_config` and `convert_override` (policy entries).
"""

import dataclasses
from typing import Any, Callable, Mapping

from motab_jax.models.paged_attention import PAGED_IMPLS

Check = Callable[[Any], bool]


def knob(default: Any, *, rule: str = "", ok: Check | None = None, overridable: bool = False,
         doc: str = "") -> Any:
    """A `SynthesisConfig` field: `ok(value)` must hold (else "must be {rule}"); `overridable`: per policy run."""
    if (ok is None) != (not rule):
        raise ValueError("a knob's check needs both `ok` and `rule` (or neither)")
    return dataclasses.field(default=default, metadata=dict(rule=rule, ok=ok, overridable=overridable, doc=doc))


def _number(value: Any) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def _integer(minimum: int) -> Check:
    return lambda v: isinstance(v, int) and _number(v) >= minimum


_POSITIVE = "an integer >= 1"
_TEMPERATURE = ">= 0 (0 = greedy)"


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
    """The synthesis section (spec section 3). Override on the command line: --config.synthesis.eps0=0.3."""

    policy: Any = knob("motab", doc="policy name (policies.POLICY_NAMES) or a Policy object; used when "
                                    "`policies` is empty (its names are checked by validation)")
    eps0: float = knob(0.2, rule="in (0, 1] (the paper: 0.2; useful 0.1-0.5)", ok=lambda v: 0 < _number(v) <= 1,
                       overridable=True, doc="MOTAB: boundary scale (boundary = eps0 * exp(-theta * H))")
    theta: float = knob(1.0, rule=">= 0 (0 = a fixed boundary eps0; the paper: 1.0)",
                        ok=lambda v: _number(v) >= 0, overridable=True,
                        doc="MOTAB: how fast the boundary shrinks with entropy")
    gamma: float = knob(0.9, rule="> 0 (SKD step-level; the paper sweeps 0.6-1.0)", ok=lambda v: _number(v) > 0,
                        overridable=True, doc="SKD step-level acceptance threshold")
    token_top_k: int = knob(25, rule=_POSITIVE, ok=_integer(1), overridable=True,
                            doc="SKD token-level: teacher top-k a student token must fall in")
    entropy_top_k: int = knob(20, rule=_POSITIVE, ok=_integer(1), overridable=True,
                              doc="top-k logits the step entropy is computed over")
    draft_len: int = knob(8, rule=_POSITIVE, ok=_integer(1), doc="student tokens drafted per verify chunk")
    num_slots: int = knob(8, rule=_POSITIVE, ok=_integer(1),
                          doc="trajectories decoded at once, over all engine groups (mesh.data; rounded up to a "
                              "multiple of it)")
    step_cap: int = knob(8192, rule=_POSITIVE, ok=_integer(1), doc="most tokens in one reasoning step")
    traj_cap: int = knob(32768, rule=_POSITIVE, ok=_integer(1), doc="most tokens in one trajectory")
    teacher_min_budget: int = knob(256, rule=_POSITIVE, ok=_integer(1),
                                   doc="tokens always left for the teacher after a backtrack")
    max_steps: int = knob(4096, rule=_POSITIVE, ok=_integer(1), doc="most reasoning steps in one trajectory")
    max_prompt_len: int = knob(2048, rule=_POSITIVE, ok=_integer(1), doc="most prompt tokens")
    delimiter: str = knob(".\n\n", rule="a non-empty string (the paper: '.\\n\\n')",
                          ok=lambda v: isinstance(v, str) and bool(v), doc="text that ends a reasoning step")
    revise: str = knob("However,", overridable=True,
                       doc="text recorded between a flawed student step and the teacher's rewrite")
    samples_per_question: int = knob(5, rule=_POSITIVE, ok=_integer(1), doc="trajectories per question")
    temperature: float = knob(0.6, rule=_TEMPERATURE, ok=lambda v: _number(v) >= 0, overridable=True,
                              doc="student sampling temperature")
    teacher_temperature: float = knob(0.6, rule=_TEMPERATURE, ok=lambda v: _number(v) >= 0, overridable=True,
                                      doc="teacher sampling temperature")
    top_p: float = knob(1.0, rule="in (0, 1]", ok=lambda v: 0 < _number(v) <= 1, overridable=True,
                        doc="nucleus sampling mass (student, teacher and drafts)")
    draft_temperature: float = knob(0.6, rule=_TEMPERATURE, ok=lambda v: _number(v) >= 0, overridable=True,
                                    doc="student temperature while drafting")
    seed: int = knob(0, overridable=True, doc="sampling seed")
    prompt_format: str = knob("chat", rule="'chat' or 'raw'", ok=lambda v: v in ("chat", "raw"),
                              doc="chat: the tokenizer's chat template; raw: the question text as is")
    instruction: str = knob("Please reason step by step, and put your final answer within \\boxed{}.",
                            doc="appended to every question")
    iterations_per_sync: int = knob(64, rule=_POSITIVE, ok=_integer(1),
                                    doc="engine iterations between host syncs")
    output_path: str = knob("", doc="JSONL the records are appended to (resume); run.py sets it")
    memory_budget_gb: float = knob(0.0, rule=">= 0 (0 = the devices' memory)", ok=lambda v: _number(v) >= 0,
                                   doc="GiB the job may use over all devices; the KV page pools get what the "
                                       "weights leave (0 = the devices' memory; on CPU a quarter of the RAM)")
    page_size: int = knob(16, rule=_POSITIVE, ok=_integer(1), doc="positions per KV-cache page")
    num_pages: int = knob(0, rule="an integer >= 0 (0 = sized from the devices' memory)", ok=_integer(0),
                          doc="pages per model's KV page pool in each engine group")
    paged_impl: str = knob("auto", rule="one of " + ", ".join(map(repr, PAGED_IMPLS)),
                           ok=lambda v: v in PAGED_IMPLS, doc="paged attention kernel")
    extra_stop_tokens: tuple[int, ...] = knob((), doc="token ids that also end a trajectory")
    teacher_prompt_format: str = knob("", rule="'', 'chat' or 'raw'", ok=lambda v: v in ("", "chat", "raw"),
                                      doc="text-level scoring: how the teacher's prompt is rendered with its own "
                                          "tokenizer ('' = prompt_format)")
    first_token_unscored: bool = knob(False, rule="True or False", ok=lambda v: isinstance(v, bool),
                                      overridable=True,
                                      doc="text-level scoring: reproduce the released code's artefact (a): V_T leaves "
                                          "out the first teacher token of each step (a one-token step gets V_T = 0)")
    entropy_zero: bool = knob(False, rule="True or False", ok=lambda v: isinstance(v, bool), overridable=True,
                              doc="text-level scoring: reproduce the released code's artefact (b): H = 0, so the "
                                  "boundary is eps0 for every step (not adaptive)")
    scoring: str = knob("auto", rule="'auto' or 'text'", ok=lambda v: v in ("auto", "text"), overridable=True,
                        doc="what the teacher scores: auto = the student's tokens when the models share a "
                            "vocabulary, its text otherwise; text = always the student's text re-encoded by the "
                            "teacher's tokenizer (the authors' definition; needs the teacher's tokenizer)")


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(SynthesisConfig)}
DEFAULTS: dict[str, Any] = {name: f.default for name, f in FIELDS.items()}
OVERRIDABLE: tuple[str, ...] = tuple(name for name, f in FIELDS.items() if f.metadata["overridable"])


def synthesis_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Every invalid value in a synthesis section (field names as in DEFAULTS), with the accepted range."""
    problems = [f"unknown field {k!r}; accepted: {sorted(DEFAULTS)}" for k in sorted(set(cfg) - set(DEFAULTS))]
    for name, f in FIELDS.items():
        ok = f.metadata["ok"]
        if name in cfg and ok is not None and not ok(cfg[name]):
            problems.append(f"{name}={cfg[name]!r}: must be {f.metadata['rule']}")
    return problems


def resolve_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """DEFAULTS updated by `config`; raises ValueError listing every invalid value."""
    cfg = dict(DEFAULTS)
    cfg.update(config or {})
    problems = synthesis_problems(cfg)
    if problems:
        raise ValueError("invalid synthesis configuration: " + "; ".join(problems))
    return cfg


def convert_override(field: str, text: str) -> Any:
    """The value `field=text` in a `policies` entry stands for, converted to the field's type."""
    if field not in FIELDS:
        raise ValueError(f"unknown field {field!r}; accepted: {sorted(DEFAULTS)}")
    kind = FIELDS[field].type
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{field}={text!r} is not a boolean")
        return text.lower() in ("true", "1")
    if kind not in (int, float, str):
        raise ValueError(f"{field} cannot be set from text")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{field}={text!r} is not {'an integer' if kind is int else 'a number'}") from None


__all__ = ["DEFAULTS", "OVERRIDABLE", "SynthesisConfig", "convert_override", "knob", "resolve_config",
           "synthesis_problems"]
