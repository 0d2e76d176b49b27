"""Must-catch cases: a curated set of texts per harmful label that a bundle must never answer wrongly.

A case is *missed* when the decision (made as the services make it, through the cascade) answers it with
another label; an abstention is not a miss (the text goes to a person). The trainer's gate rejects a
challenger that misses any case its bundle carries (`must_catch.csv`, copied in by `flockwatch train
--must-catch`); `flockwatch safety` (`make test-safety`) runs the same check on any bundle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flockwatch.common.artifacts import read_manifest, verified_file
from flockwatch.common.datasets import Dataset, read_table

MUST_CATCH = "must_catch.csv"


@dataclass(frozen=True)
class SafetyResult:
    """How a bundle decided the must-catch cases."""

    n: int
    caught: int
    abstained: int
    missed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No case answered with a label other than its own."""
        return not self.missed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**asdict(self), "passed": self.passed}


def load_cases(path: Path) -> Dataset:
    """The cases (a CSV or JSONL file with text and label columns)."""
    return read_table(path, "text", "label")


def bundle_cases(model_dir: Path) -> Dataset | None:
    """The must-catch cases a bundle carries (verified through its manifest); None when it has none."""
    if MUST_CATCH not in read_manifest(model_dir, verify=False).files:
        return None
    return load_cases(verified_file(model_dir, MUST_CATCH))


def check_must_catch(model_dir: Path, cases: Dataset) -> SafetyResult:
    """Decide every case as the running system would and list the ones answered wrongly."""
    from flockwatch.trainer.evaluate import decide_all

    unknown = sorted(set(cases.labels) - set(read_classes(model_dir)))
    if unknown:
        raise ValueError(f"must-catch labels the bundle does not know: {unknown}")
    decisions = decide_all(model_dir, list(cases.texts)).decisions
    missed = [
        {"text": text, "label": label, "prediction": d.prediction, "confidence": round(d.confidence, 4)}
        for text, label, d in zip(cases.texts, cases.labels, decisions, strict=True)
        if d.prediction is not None and d.prediction != label
    ]
    abstained = sum(d.prediction is None for d in decisions)
    return SafetyResult(len(cases), len(cases) - len(missed) - abstained, abstained, missed)


def read_classes(model_dir: Path) -> list[str]:
    """The bundle's label names."""
    from flockwatch.common.labels import LabelConfig

    return LabelConfig.load(verified_file(model_dir, "labels.yaml")).names
