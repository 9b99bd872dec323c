"""The `policies` field: which synthesis runs a job makes, each with its own output files.

An entry is a policy name, optionally with synthesis fields overridden for that run only, so one job can
sweep a baseline's parameter: "motab,skd_step@gamma=0.6,skd_step@gamma=0.8,motab@eps0=0.3&theta=2".
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from motab_jax.motab.config import OVERRIDABLE, convert_override
from motab_jax.motab.policies import POLICY_NAMES, make_policy

# OVERRIDABLE: the fields an entry may override, the ones that change what a policy does, not the engine's
# shapes; each is marked `overridable` in motab_jax/motab/config.py:SynthesisConfig.


@dataclasses.dataclass(frozen=True)
class PolicyRun:
    label: str  # the entry as written: results tables and summaries are keyed by it
    policy: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def stem(self) -> str:
        """File-name form of the label: synthesis_<stem>.jsonl, sft_<stem>/."""
        return re.sub(r"[^A-Za-z0-9_.-]", "", self.label.replace("@", "_").replace("&", "_").replace("=", ""))

    def synthesis_section(self, section: Mapping[str, Any]) -> dict[str, Any]:
        return dict(section, policy=self.policy, **dict(self.overrides))

    @property
    def judges_steps(self) -> bool:
        return make_policy(self.policy).judges_steps


def parse_policy_entry(entry: str) -> PolicyRun:
    """`name[@field=value[&field=value...]]` -> PolicyRun; raises ValueError naming what is wrong."""
    name, _, rest = entry.strip().partition("@")
    if name not in POLICY_NAMES:
        raise ValueError(f"policies: unknown policy {name!r} in {entry!r}; accepted: {', '.join(POLICY_NAMES)}")
    overrides = []
    for item in filter(None, rest.split("&")):
        field, eq, value = item.partition("=")
        if not eq or field not in OVERRIDABLE:
            raise ValueError(f"policies: {item!r} in {entry!r} is not field=value with a field of "
                             f"{', '.join(OVERRIDABLE)}")
        try:
            overrides.append((field, convert_override(field, value)))
        except ValueError as e:
            raise ValueError(f"policies: {entry!r}: {e}") from None
    return PolicyRun(entry.strip(), name, tuple(overrides))


def policy_runs(config: Any) -> list[PolicyRun]:
    """The runs named by `config.policies` (comma-separated entries; empty: `synthesis.policy`), in order."""
    entries = str(config.policies).strip() or str(config.synthesis.policy)
    runs = [parse_policy_entry(e) for e in entries.split(",") if e.strip()]
    stems = [r.stem for r in runs]
    if len(set(stems)) != len(stems):
        raise ValueError(f"policies: entries {[r.label for r in runs]} repeat a run; give each once")
    return runs


def find_run(config: Any, label: str) -> PolicyRun:
    """The run `label` (as written in `policies`, or its file stem) names."""
    for run in policy_runs(config):
        if label in (run.label, run.stem):
            return run
    return parse_policy_entry(label)
