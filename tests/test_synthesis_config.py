"""The synthesis knobs' single declaration (motab_jax/motab/config.py) and what is derived from it."""

from __future__ import annotations

import dataclasses
import re

import pytest

from configs import base
from motab_jax.motab.config import (DEFAULTS, OVERRIDABLE, SynthesisConfig, convert_override, resolve_config,
                                    synthesis_problems)
from motab_jax.models.paged_attention import PAGED_IMPLS
from motab_jax.pipeline.policy_runs import parse_policy_entry


def test_defaults_are_the_dataclass_fields():
    fields = {f.name: f.default for f in dataclasses.fields(SynthesisConfig)}
    assert fields == DEFAULTS
    assert dataclasses.asdict(SynthesisConfig()) == DEFAULTS
    assert set(base.get_config().synthesis.to_dict()) == set(DEFAULTS)
    assert (DEFAULTS["max_steps"], DEFAULTS["page_size"], DEFAULTS["num_pages"], DEFAULTS["paged_impl"]) == \
        (4096, 16, 0, "auto")
    assert DEFAULTS["paged_impl"] in PAGED_IMPLS


def test_every_field_is_documented():
    for f in dataclasses.fields(SynthesisConfig):
        assert f.metadata["doc"], f.name


def test_defaults_have_no_problems():
    assert synthesis_problems(DEFAULTS) == []
    assert resolve_config(None) == DEFAULTS
    assert resolve_config({"eps0": 0.3})["eps0"] == 0.3


@pytest.mark.parametrize("field,value,pattern", [
    ("eps0", 1.5, r"eps0=1\.5: must be in \(0, 1\]"),
    ("theta", -1, r"theta=-1: must be >= 0"),
    ("num_pages", -1, r"num_pages=-1: must be an integer >= 0"),
    ("num_pages", 1.5, r"num_pages=1\.5: must be an integer >= 0"),
    ("page_size", 0, r"page_size=0: must be an integer >= 1"),
    ("paged_impl", "nope", r"paged_impl='nope': must be one of 'auto', 'reference'"),
    ("max_steps", 0, r"max_steps=0: must be an integer >= 1"),
    ("max_steps", True, r"max_steps=True: must be an integer >= 1"),
    ("top_p", 0, r"top_p=0: must be in \(0, 1\]"),
    ("delimiter", "", r"delimiter='': must be a non-empty string"),
    ("prompt_format", "xml", r"prompt_format='xml': must be 'chat' or 'raw'"),
])
def test_check_rejects_bad_value_naming_the_field(field, value, pattern):
    problems = synthesis_problems({**DEFAULTS, field: value})
    assert len(problems) == 1 and re.match(pattern, problems[0]), problems
    with pytest.raises(ValueError, match="invalid synthesis configuration: " + pattern):
        resolve_config({field: value})


def test_unknown_field_is_named():
    problems = synthesis_problems({"epsilon": 0.2})
    assert problems == [f"unknown field 'epsilon'; accepted: {sorted(DEFAULTS)}"]


def test_overridable_fields():
    assert set(OVERRIDABLE) == {"eps0", "theta", "gamma", "token_top_k", "entropy_top_k", "temperature",
                                "teacher_temperature", "draft_temperature", "top_p", "revise", "seed", "scoring",
                                "first_token_unscored", "entropy_zero"}


def test_convert_override():
    assert convert_override("gamma", "0.7") == 0.7
    assert convert_override("seed", "3") == 3 and isinstance(convert_override("seed", "3"), int)
    assert convert_override("revise", "Wait,") == "Wait,"
    assert convert_override("scoring", "text") == "text" and convert_override("entropy_zero", "true") is True
    with pytest.raises(ValueError, match=r"entropy_zero='yes' is not a boolean"):
        convert_override("entropy_zero", "yes")
    with pytest.raises(ValueError, match=r"theta='x' is not a number"):
        convert_override("theta", "x")
    with pytest.raises(ValueError, match=r"token_top_k='2\.5' is not an integer"):
        convert_override("token_top_k", "2.5")


def test_policy_entry_overrides():
    run = parse_policy_entry("skd_step@gamma=0.6&seed=2")
    assert run.overrides == (("gamma", 0.6), ("seed", 2))
    with pytest.raises(ValueError, match=r"'num_slots=4' in 'motab@num_slots=4' is not field=value"):
        parse_policy_entry("motab@num_slots=4")
    with pytest.raises(ValueError, match=r"'motab@eps0=big': eps0='big' is not a number"):
        parse_policy_entry("motab@eps0=big")


# ------------------------------------------------------------------------------------ a gpt-oss teacher's reasoning
def _harmony_tokenizer(template: str | None = None):
    """A small tokenizer that speaks harmony (the byte-level one with harmony's special tokens and chat template):
    the o200k one takes ~10 s to build."""
    from motab_jax.text import byte_level_tokenizer
    from motab_jax.text.harmony import harmony_chat_template

    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|message|>", "<|end|>", "<|channel|>"]})
    tok.chat_template = template or harmony_chat_template()
    return tok


# Abridged from gpt-oss's own chat template (its default sits in a macro, as released).
GPT_OSS_TEMPLATE = """{%- macro build_system_message() -%}
{%- if reasoning_effort is not defined %}{%- set reasoning_effort = "medium" %}{%- endif %}
{{- "Reasoning: " + reasoning_effort + "\\n\\n" }}
{%- endmacro -%}
{{- "<|start|>system<|message|>" }}{{- build_system_message() }}{{- "<|end|>" }}
{%- for m in messages %}{{- "<|start|>" + m['role'] + "<|message|>" + m['content'] + "<|end|>" }}{%- endfor %}
{%- if add_generation_prompt %}<|start|>assistant{%- endif %}"""


@pytest.mark.parametrize("template", [None, GPT_OSS_TEMPLATE], ids=["ours", "gpt-oss's"])
@pytest.mark.parametrize("level", ["low", "high"])
def test_a_gpt_oss_models_reasoning_level_is_the_config_field(template, level):
    """`teacher.reasoning_effort` becomes the default of the model's chat template (what build_model hands to
    synthesis and evaluation): the prompt equals the template's own rendering with `reasoning_effort=level`
    (tests/test_gpt_oss.py checks that one against openai-harmony); an explicit argument still wins."""
    from motab_jax.models.factory import spec_tokenizer
    from motab_jax.text.prompts import question_prompt

    spec = base.model_spec()
    assert spec.reasoning_effort == "medium"  # the template's default, which the released code keeps
    spec.reasoning_effort = level
    plain = _harmony_tokenizer(template)
    want = plain.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                     tokenize=False, reasoning_effort=level)
    assert f"Reasoning: {level}\n" in want
    tok = spec_tokenizer(_harmony_tokenizer(template), spec)
    assert question_prompt(tok, "What is 2+2?")[0] == want
    spec.reasoning_effort = "medium"  # set again: the newest level holds, no stacked defaults
    tok = spec_tokenizer(tok, spec)
    assert "Reasoning: medium\n" in question_prompt(tok, "What is 2+2?")[0]
    assert tok.chat_template.count("set reasoning_effort = '") == 1
    explicit = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False,
                                       reasoning_effort="low")
    assert "Reasoning: low\n" in explicit
    # A tokenizer without harmony is untouched.
    from motab_jax.text import byte_level_tokenizer

    other = byte_level_tokenizer()
    assert spec_tokenizer(other, spec).chat_template == byte_level_tokenizer().chat_template


def test_reasoning_levels_are_validated_and_recorded_as_stage_inputs(tmp_path):
    from configs import demo
    from motab_jax.pipeline import validate_config
    from motab_jax.pipeline.stage_inputs import StageRecord, _changes, inputs_of
    from motab_jax.pipeline.validation import ModelFacts, reasoning_problems
    from motab_jax.text import byte_level_tokenizer

    config = demo.get_config()
    config.teacher.reasoning_effort = "extreme"
    assert any(re.fullmatch(r"teacher\.reasoning_effort='extreme': accepted low, medium, high .*", p)
               for p in validate_config(config))
    # A level on a model without harmony would do nothing: the preflight says so.
    config.teacher.reasoning_effort = "high"
    facts = {"teacher": ModelFacts("teacher", None, byte_level_tokenizer()),
             "student": ModelFacts("student", None, byte_level_tokenizer())}
    assert [p.split(":")[0] for p in reasoning_problems(config, facts)] == ["teacher.reasoning_effort='high'"]
    facts["teacher"] = ModelFacts("teacher", None, _harmony_tokenizer())
    assert reasoning_problems(config, facts) == []
    # Synthesis and evaluation record it: a change is refused; a record from before the field existed matches the
    # level it had then ("medium") and no other.
    config.teacher.reasoning_effort = "medium"
    for stage in ("synthesize", "eval"):
        inputs = inputs_of(config, [stage])
        assert inputs["teacher.reasoning_effort"] == "medium"
        record = StageRecord(stage, [stage], inputs)
        assert _changes(record, config) == {}
        config.teacher.reasoning_effort = "high"
        assert list(_changes(record, config)) == ["teacher.reasoning_effort"]
        old = StageRecord(stage, [stage], {k: v for k, v in inputs.items() if not k.endswith("reasoning_effort")})
        assert list(_changes(old, config)) == ["teacher.reasoning_effort"]
        config.teacher.reasoning_effort = "medium"
        assert _changes(old, config) == {}
