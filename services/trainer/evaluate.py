"""Evaluate a model bundle on labeled texts: every voter and the ensemble, through the services' own code."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flockwatch.arbiter.app import load_policy
from flockwatch.classical_voter.app import load_core as load_classical
from flockwatch.common.artifacts import read_manifest, verified_file
from flockwatch.common.datasets import Dataset
from flockwatch.common.events import Decision, TextSubmitted
from flockwatch.common.labels import LabelConfig
from flockwatch.common.metrics import classification_report
from flockwatch.common.service import VoterCore
from flockwatch.common.slices import SliceConfig
from flockwatch.common.voting import Opinion, to_vote
from flockwatch.regex_voter.app import load_core as load_regex


def load_cores(model_dir: Path) -> list[VoterCore]:
    """Every voter core the bundle configures."""
    return [core for core in (load_regex(model_dir), load_classical(model_dir)) if core is not None]


def opinions_matrix(opinions: Sequence[Opinion], classes: list[str]) -> np.ndarray:
    """Rows of class probabilities; NaN rows where the voter abstained."""
    out = np.full((len(opinions), len(classes)), np.nan)
    for i, op in enumerate(opinions):
        if op.probabilities is not None:
            out[i] = [op.probabilities.get(c, 0.0) for c in classes]
    return out


def decide_all(model_dir: Path, texts: list[str], batch: int = 512) -> tuple[list[Decision], dict[str, list[Opinion]]]:
    """Run every voter and the arbiter on texts, exactly as the services do (minus the bus)."""
    cores = load_cores(model_dir)
    policy = load_policy(model_dir)
    opinions: dict[str, list[Opinion]] = {}
    for core in cores:
        for start in range(0, len(texts), batch):
            for voter, column in core.predict(texts[start : start + batch]).items():
                opinions.setdefault(voter, []).extend(column)
    versions = {voter: core.version for core in cores for voter in core.voters}
    decisions = []
    for i, text in enumerate(texts):
        msg = TextSubmitted(message_id=f"eval:{i}", text_id=f"eval-{i}", text=text)
        votes = [to_vote(msg, voter, versions[voter], column[i], 0.0) for voter, column in opinions.items()]
        missing = [v for v in policy.expected_voters if v not in opinions]
        decisions.append(policy.decide(votes, msg.text_id, 0.0, missing))
    return decisions, opinions


def evaluate(model_dir: Path, data: Dataset) -> dict[str, Any]:
    """metrics.json content: per voter, the ensemble, its decision paths, and per slice."""
    labels = LabelConfig.load(verified_file(model_dir, "labels.yaml"))
    classes = labels.names
    unknown = sorted(set(data.labels) - set(classes))
    if unknown:
        raise ValueError(f"the data has labels the model does not know: {unknown}")
    decisions, opinions = decide_all(model_dir, data.texts)
    report: dict[str, Any] = {"n": len(data), "classes": classes, "voters": {}}
    for voter, column in opinions.items():
        probs = opinions_matrix(column, classes)
        report["voters"][voter] = classification_report(data.labels, probs, classes)
    ens = np.array([[d.probabilities.get(c, 0.0) for c in classes] for d in decisions])
    answered = np.array([not d.abstain for d in decisions])
    report["ensemble"] = classification_report(data.labels, ens, classes, answered=answered)
    report["ensemble"]["paths"] = dict(Counter(d.path for d in decisions))
    report["ensemble"]["set_size_mean"] = float(np.mean([len(d.prediction_set) for d in decisions]))
    report["slices"] = _slices(model_dir, data, ens, answered, classes)
    return report


def _slices(
    model_dir: Path, data: Dataset, ens: np.ndarray, answered: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    if "slices.yaml" not in read_manifest(model_dir, verify=False).files:
        return {}
    config = SliceConfig.load(verified_file(model_dir, "slices.yaml"))
    out = {}
    for name, idx in config.members(data.texts).items():
        if idx:
            out[name] = classification_report([data.labels[i] for i in idx], ens[idx], classes, answered=answered[idx])
    return out
