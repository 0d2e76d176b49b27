"""The rules file (`rules.yaml`): regex rules with priorities, confidences and safety triggers."""

from __future__ import annotations

import re
from functools import reduce
from pathlib import Path
from typing import Any, Literal

from flockwatch.common.labels import LabelConfig
from flockwatch.common.yamlconfig import ConfigError, line_of, load_model, load_yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

FlagName = Literal["IGNORECASE", "MULTILINE", "DOTALL", "ASCII", "VERBOSE"]
Loc = tuple[int | str, ...]


class SafetySpec(BaseModel):
    """What a fired rule demands of the final decision."""

    model_config = ConfigDict(extra="forbid")

    min_label: str | None = Field(None, description="The decision may not be less harmful than this label.")
    review: bool = Field(False, description="The decision must be an abstention sent to human review.")

    @model_validator(mode="after")
    def _demands_something(self) -> SafetySpec:
        if self.min_label is None and not self.review:
            raise ValueError("safety needs min_label or review: true")
        return self


class Defaults(BaseModel):
    """Values a rule inherits when it does not set them."""

    model_config = ConfigDict(extra="forbid")

    flags: list[FlagName] = Field(default_factory=list)
    confidence: float = Field(0.9, gt=0, le=1)


class RuleSpec(BaseModel):
    """One rule: patterns that must match (any or all), exclusions that must not, and what it says."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    label: str | None = None
    priority: int = 0
    confidence: float | None = Field(None, gt=0, le=1)
    patterns: list[str] = Field(min_length=1)
    match: Literal["any", "all"] = "any"
    exclude: list[str] = Field(default_factory=list)
    flags: list[FlagName] | None = None
    safety: SafetySpec | None = None

    @model_validator(mode="after")
    def _says_something(self) -> RuleSpec:
        if self.label is None and self.safety is None:
            raise ValueError(f"rule {self.id!r} needs a label, a safety trigger or both")
        return self


class RuleSet(BaseModel):
    """A whole rules file."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(None, description="Informational only.")
    description: str = ""
    defaults: Defaults = Field(default_factory=Defaults)
    rules: list[RuleSpec] = Field(min_length=1)

    @field_validator("rules")
    @classmethod
    def _ids_unique_and_regexes_compile(cls, rules: list[RuleSpec], info: ValidationInfo) -> list[RuleSpec]:
        defaults = info.data.get("defaults") or Defaults()
        problems = []
        seen: dict[str, int] = {}
        for i, rule in enumerate(rules):
            if rule.id in seen:
                problems.append(
                    f"rule {rule.id!r}{_at(info, ('rules', i, 'id'))}: duplicate id (first at rules.{seen[rule.id]})"
                )
            seen.setdefault(rule.id, i)
            flags = compile_flags(rule.flags if rule.flags is not None else defaults.flags)
            for field in ("patterns", "exclude"):
                for j, pattern in enumerate(getattr(rule, field)):
                    try:
                        re.compile(pattern, flags)
                    except re.error as exc:
                        where = _at(info, ("rules", i, field, j))
                        problems.append(f"rule {rule.id!r}{where}: {field}[{j}] {pattern!r}: invalid regex: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return rules

    def flags_for(self, rule: RuleSpec) -> int:
        """The `re` flags a rule compiles with (its own, or the defaults)."""
        return compile_flags(rule.flags if rule.flags is not None else self.defaults.flags)

    def confidence_for(self, rule: RuleSpec) -> float:
        """The probability a rule gives its label when it wins (its own, or the default)."""
        return rule.confidence if rule.confidence is not None else self.defaults.confidence

    def labels_used(self) -> list[str]:
        """Distinct labels the rules name (as label or safety floor), in order of first use."""
        names = [n for r in self.rules for n in (r.label, r.safety.min_label if r.safety else None) if n]
        return list(dict.fromkeys(names))


def compile_flags(names: list[FlagName]) -> int:
    """Combine flag names into `re` flags."""
    return reduce(lambda acc, name: acc | int(getattr(re, name)), names, 0)


def _at(info: ValidationInfo, loc: Loc) -> str:
    """' (line N)' when validating a loaded YAML file, else ''."""
    data = (info.context or {}).get("data")
    line = line_of(data, loc) if data is not None else None
    return f" (line {line})" if line else ""


def label_problems(ruleset: RuleSet, labels: LabelConfig) -> list[tuple[Loc, str]]:
    """Rules that name labels the task does not have, or whose confidence would not make their label top."""
    known, floor = set(labels.names), 1 / len(labels.names)
    problems: list[tuple[Loc, str]] = []
    for i, rule in enumerate(ruleset.rules):
        for where, name in ((("rules", i, "label"), rule.label), (("rules", i, "safety", "min_label"), _floor(rule))):
            if name is not None and name not in known:
                problems.append((where, f"rule {rule.id!r}: unknown label {name!r}; known: {', '.join(labels.names)}"))
        if rule.label is not None and ruleset.confidence_for(rule) <= floor:
            loc: Loc = ("rules", i, "confidence") if rule.confidence is not None else ("defaults", "confidence")
            problems.append((loc, f"rule {rule.id!r}: confidence must be above 1/{len(known)} = {floor:.3f}"))
    return problems


def _floor(rule: RuleSpec) -> str | None:
    return rule.safety.min_label if rule.safety else None


def check_labels(ruleset: RuleSet, labels: LabelConfig, path: Path | None = None, data: Any = None) -> None:
    """Raise ConfigError (naming file, line, field and rule) if the rules do not fit the task's labels."""
    lines = []
    for loc, message in label_problems(ruleset, labels):
        line = line_of(data, loc) if data is not None else None
        where = f"{path}:{line}: " if path and line else f"{path}: " if path else ""
        lines.append(f"{where}{'.'.join(map(str, loc))}: {message}")
    if lines:
        raise ConfigError("\n".join(lines))


def load_rules(path: Path | str, labels: LabelConfig) -> RuleSet:
    """Load and validate `rules.yaml` against the task's labels, or raise ConfigError."""
    path = Path(path)
    ruleset: RuleSet = load_model(path, RuleSet)
    check_labels(ruleset, labels, path, load_yaml(path))
    return ruleset
