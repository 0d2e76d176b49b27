"""The labeling-function registry: regex rules, keyword LFs from `lfs.yaml`, and confident other voters."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flockwatch.common.labels import LabelConfig
from flockwatch.common.yamlconfig import ConfigError, line_of, load_model, load_yaml
from flockwatch.regex_voter.rules import FlagName, RuleSet, compile_flags, load_rules
from pydantic import BaseModel, ConfigDict, Field, model_validator

Loc = tuple[int | str, ...]
Choice = Literal["auto", "label_model", "majority"]


class KeywordSpec(BaseModel):
    """A keyword or pattern LF: votes its label when its words/patterns match (any/all) and no exclusion does."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    label: str
    keywords: list[str] = Field(default_factory=list, description="Whole words or phrases (escaped, \\b-bounded).")
    patterns: list[str] = Field(default_factory=list, description="Regular expressions.")
    match: Literal["any", "all"] = "any"
    exclude: list[str] = Field(default_factory=list)
    flags: list[FlagName] | None = None

    @model_validator(mode="after")
    def _has_something_to_match(self) -> KeywordSpec:
        if not self.keywords and not self.patterns:
            raise ValueError(f"LF {self.id!r} needs keywords or patterns")
        return self

    def regexes(self) -> list[str]:
        """Keywords as bounded regexes, followed by the patterns."""
        return [rf"\b{re.escape(k)}\b" for k in self.keywords] + self.patterns


class VoterSpec(BaseModel):
    """An LF from another voter: it votes that voter's top class when its probability is at least `min_prob`."""

    model_config = ConfigDict(extra="forbid")

    voter: str = Field(min_length=1, max_length=64)
    min_prob: float = Field(0.9, gt=0, le=1)

    @property
    def id(self) -> str:
        """The LF's name."""
        return f"voter:{self.voter}>={self.min_prob:g}"


class LabelModelSpec(BaseModel):
    """Training settings of the Snorkel label model."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int = Field(100, ge=1, le=100_000)
    lr: float = Field(0.01, gt=0)
    l2: float = Field(0.0, ge=0)
    class_balance: Literal["majority", "uniform"] = Field(
        "majority", description="Class prior: the shares majority vote finds on covered texts, or uniform."
    )


class LFFile(BaseModel):
    """A whole `lfs.yaml`."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(None, description="Informational only.")
    description: str = ""
    min_lfs: int = Field(1, ge=1, description="Abstain when fewer LFs than this fire on a text.")
    model: Choice = Field("auto", description="auto: the better of label model and majority vote on labeled data.")
    label_model: LabelModelSpec = Field(default_factory=LabelModelSpec)
    flags: list[FlagName] = Field(default_factory=lambda: ["IGNORECASE"], description="Default regex flags.")
    lfs: list[KeywordSpec] = Field(default_factory=list)
    voters: list[VoterSpec] = Field(default_factory=list)


@dataclass(frozen=True)
class PatternLF:
    """A compiled pattern LF (from a regex rule or a keyword entry)."""

    id: str
    source: str
    label: str
    patterns: tuple[re.Pattern[str], ...]
    match_all: bool
    excludes: tuple[re.Pattern[str], ...]

    def __getstate__(self) -> dict[str, Any]:
        """Plain state (what skops can write): each compiled pattern as its source and flags."""
        state = dict(self.__dict__)
        for name in ("patterns", "excludes"):
            state[name] = [[p.pattern, p.flags] for p in state[name]]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        for name in ("patterns", "excludes"):
            state[name] = tuple(re.compile(p, flags) for p, flags in state[name])
        self.__dict__.update(state)  # frozen: set once, here, as the dataclass's own __init__ would

    def fires(self, text: str) -> bool:
        """Patterns match (any/all) and no exclusion does: the regex rules' semantics."""
        hits = (p.search(text) for p in self.patterns)
        matched = all(hits) if self.match_all else any(hits)
        return matched and not any(p.search(text) for p in self.excludes)


@dataclass(frozen=True)
class VoterLF:
    """A compiled voter LF."""

    id: str
    voter: str
    min_prob: float
    source: str = "voter"


@dataclass(frozen=True)
class LFSet:
    """Every labeling function of a task, in a fixed column order: pattern LFs, then voter LFs."""

    classes: tuple[str, ...]
    patterns: tuple[PatternLF, ...]
    voters: tuple[VoterLF, ...] = ()
    min_lfs: int = 1
    choice: Choice = "auto"
    label_model: LabelModelSpec = field(default_factory=LabelModelSpec)
    definition: dict[str, Any] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        """LF names in column order."""
        return [lf.id for lf in self.patterns] + [lf.id for lf in self.voters]

    @property
    def sources(self) -> list[str]:
        """Where each LF comes from (regex, keyword, voter), in column order."""
        return [lf.source for lf in self.patterns] + [lf.source for lf in self.voters]

    @property
    def lf_labels(self) -> list[str]:
        """The label each LF votes ('top class' for voter LFs), in column order."""
        return [lf.label for lf in self.patterns] + ["(top class)" for _ in self.voters]

    @property
    def needed_voters(self) -> list[str]:
        """Names of the voters whose outputs the LFs read."""
        return list(dict.fromkeys(lf.voter for lf in self.voters))

    @property
    def version(self) -> str:
        """First 12 hex of the sha256 of the canonical definition."""
        canonical = json.dumps({"classes": self.classes, **self.definition}, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _compile(spec_id: str, source: str, label: str, regexes: Sequence[str], spec: Any, flags: int) -> PatternLF:
    return PatternLF(
        id=spec_id,
        source=source,
        label=label,
        patterns=tuple(re.compile(p, flags) for p in regexes),
        match_all=spec.match == "all",
        excludes=tuple(re.compile(p, flags) for p in spec.exclude),
    )


def _rule_lfs(ruleset: RuleSet) -> list[PatternLF]:
    """Each labeled rule is one LF voting its label (safety-only rules have no label and are left out)."""
    return [
        _compile(f"regex:{r.id}", "regex", r.label, r.patterns, r, ruleset.flags_for(r))
        for r in ruleset.rules
        if r.label is not None
    ]


def _problems(spec: LFFile, labels: LabelConfig) -> list[tuple[Loc, str]]:
    """Unknown labels, bad regexes and duplicate ids, each with where it is."""
    problems: list[tuple[Loc, str]] = []
    seen: set[str] = set()
    for i, lf in enumerate(spec.lfs):
        if lf.id in seen:
            problems.append((("lfs", i, "id"), f"duplicate LF id {lf.id!r}"))
        seen.add(lf.id)
        if lf.label not in labels.names:
            problems.append((("lfs", i, "label"), f"LF {lf.id!r}: unknown label {lf.label!r}; known: {labels.names}"))
        flags = compile_flags(_flags(lf, spec))
        for name in ("patterns", "exclude"):
            for j, pattern in enumerate(getattr(lf, name)):
                try:
                    re.compile(pattern, flags)
                except re.error as exc:
                    problems.append(((("lfs", i, name, j)), f"LF {lf.id!r}: invalid regex {pattern!r}: {exc}"))
    voters = [v.id for v in spec.voters]
    problems += [(("voters", i), f"duplicate voter LF {v}") for i, v in enumerate(voters) if v in voters[:i]]
    return problems


def load_lf_file(path: Path, labels: LabelConfig) -> LFFile:
    """Load and validate `lfs.yaml` against the task's labels, or raise ConfigError naming file:line."""
    spec = load_model(path, LFFile)
    problems = _problems(spec, labels)
    if problems:
        data = load_yaml(path)
        raise ConfigError("\n".join(f"{path}:{line_of(data, loc) or '?'}: {_dotted(loc)}: {m}" for loc, m in problems))
    return spec


def _flags(lf: KeywordSpec, spec: LFFile) -> list[FlagName]:
    return lf.flags if lf.flags is not None else spec.flags


def _dotted(loc: Loc) -> str:
    return ".".join(map(str, loc))


def build_lfs(labels: LabelConfig, ruleset: RuleSet | None, spec: LFFile | None) -> LFSet:
    """Compile rules and an LF file into an LFSet (already validated)."""
    spec = spec or LFFile()
    patterns = _rule_lfs(ruleset) if ruleset is not None else []
    patterns += [
        _compile(lf.id, "keyword", lf.label, lf.regexes(), lf, compile_flags(_flags(lf, spec))) for lf in spec.lfs
    ]
    voters = [VoterLF(v.id, v.voter, v.min_prob) for v in spec.voters]
    if not patterns and not voters:
        raise ConfigError("no labeling functions: give a rules file with labeled rules, keyword LFs or voter LFs")
    definition = {
        "rules": ruleset.model_dump(mode="json") if ruleset is not None else None,
        "lfs": spec.model_dump(mode="json"),
    }
    return LFSet(
        classes=tuple(labels.names),
        patterns=tuple(patterns),
        voters=tuple(voters),
        min_lfs=spec.min_lfs,
        choice=spec.model,
        label_model=spec.label_model,
        definition=definition,
    )


def load_lfs(labels: LabelConfig, rules: Path | None, lfs: Path | None) -> LFSet:
    """The LF set of a task from its rules.yaml and/or lfs.yaml (either may be None)."""
    ruleset = load_rules(rules, labels) if rules is not None else None
    spec = load_lf_file(lfs, labels) if lfs is not None else None
    return build_lfs(labels, ruleset, spec)
