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
