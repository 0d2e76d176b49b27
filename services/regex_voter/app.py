"""Regex voter service: loads the bundle's rules and votes on every submitted text."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flockwatch.common.artifacts import read_manifest, verified_file
from flockwatch.common.labels import LabelConfig
from flockwatch.common.service import VoterCore, VoterService
from flockwatch.common.voting import Opinion
from flockwatch.regex_voter.model import RuleEngine
from flockwatch.regex_voter.rules import load_rules

VOTER = "regex"


class RegexCore(VoterCore):
    """The rule engine under the voter name `regex`."""

    voters = (VOTER,)

    def __init__(self, engine: RuleEngine) -> None:
        self.engine = engine
        self.version = f"rules-{engine.version}"

    def predict(self, texts: Sequence[str]) -> dict[str, list[Opinion]]:
        return {VOTER: self.engine.predict(texts)}


def load_core(model_dir: Path) -> RegexCore | None:
    """The engine for a bundle's rules.yaml, or None when the bundle has no rules."""
    manifest = read_manifest(model_dir, verify=False)
    if "rules.yaml" not in manifest.files:
        return None
    labels = LabelConfig.load(verified_file(model_dir, "labels.yaml"))
    return RegexCore(RuleEngine(load_rules(verified_file(model_dir, "rules.yaml"), labels), labels))


class RegexVoterService(VoterService):
    """Votes with the YAML rule DSL."""

    name = "regex_voter"

    def load(self, model_dir: Path) -> RegexCore | None:
        return load_core(model_dir)
