"""The task the feedback is about: its classes and harm weights (labels.yaml) and its regex rules (rules.yaml)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from flockwatch.common.artifacts import MANIFEST, read_manifest, verified_file
from flockwatch.common.labels import LabelConfig
from flockwatch.feedback.rulestats import RuleMeta
from flockwatch.regex_voter.rules import load_rules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskConfig:
    """Classes with harm weights (None: any label is accepted, harm 1) and what each rule claims."""

    labels: LabelConfig | None = None
    rules: dict[str, RuleMeta] = field(default_factory=dict)
    source: str = "none"

    @property
    def classes(self) -> list[str] | None:
        """The configured class names, or None when no labels file is known."""
        return self.labels.names if self.labels else None

    def harm(self, label: str) -> float:
        """The harm weight of a class (1.0 for an unknown class or without labels.yaml)."""
        if self.labels is None or label not in self.labels.names:
            return 1.0
        return self.labels.harm(label)


def _bundle_file(model_dir: Path, name: str) -> Path | None:
    """The bundle's verified file; None when there is no bundle or it has no such file. A file that does not
    match the manifest raises ArtifactError: a tampered bundle must not turn the label check off."""
    if not (Path(model_dir) / MANIFEST).exists():
        return None
    return verified_file(model_dir, name) if name in read_manifest(model_dir, verify=False).files else None


def load_task(labels_path: Path | None, rules_path: Path | None, model_dir: Path | None) -> TaskConfig:
    """Explicit files first, else the model bundle's; a missing bundle gives a label-agnostic config."""
    labels_file = labels_path or (_bundle_file(model_dir, "labels.yaml") if model_dir else None)
    rules_file = rules_path or (_bundle_file(model_dir, "rules.yaml") if model_dir else None)
    if labels_file is None:
        log.warning("feedback: no labels.yaml (set FLOCKWATCH_FEEDBACK_LABELS or a model bundle); any label accepted")
        return TaskConfig()
    labels = LabelConfig.load(labels_file)
    rules: dict[str, RuleMeta] = {}
    if rules_file is not None:
        for spec in load_rules(rules_file, labels).rules:
            safety = spec.safety
            rules[spec.id] = RuleMeta(
                spec.id, spec.label, safety.min_label if safety else None, bool(safety and safety.review)
            )
    return TaskConfig(labels, rules, f"{labels_file}" + (f", {rules_file}" if rules_file else ""))
