"""`flockwatch train`: fit every configured voter and the arbiter, evaluate, and write a model bundle.

Splits are fixed by text hash (`flockwatch.common.datasets`): voters fit on train; the arbiter's pool
fits on the voters' *out-of-fold* train outputs; its abstention threshold is chosen on calibration;
the metrics come from test, which nothing trained on.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from flockwatch.arbiter.model import fit_policy, harm_weights
from flockwatch.classical_voter.model import ClassicalModel
from flockwatch.common.artifacts import Manifest, new_version, publish_dir, write_manifest
from flockwatch.common.datasets import Dataset, split
from flockwatch.common.labels import LabelConfig
from flockwatch.common.slices import SliceConfig
from flockwatch.regex_voter.model import RuleEngine
from flockwatch.regex_voter.rules import load_rules
from flockwatch.trainer.evaluate import evaluate, opinions_matrix

Progress = Callable[[str], None]


@dataclass
class TrainConfig:
    """What to train on and with which optional configuration files."""

    data: Dataset
    out: Path
    name: str
    labels: Path | None = None
    rules: Path | None = None
    slices: Path | None = None
    target_error: float = 0.05
    folds: int = 5


def _labels(config: TrainConfig) -> LabelConfig:
    labels = (
        LabelConfig.load(config.labels) if config.labels else LabelConfig.from_names(config.name, config.data.classes)
    )
    unknown = sorted(set(config.data.labels) - set(labels.names))
    if unknown:
        raise ValueError(f"the data has labels missing from {config.labels}: {unknown}")
    return labels


def train(config: TrainConfig, progress: Progress = lambda _: None) -> Path:
    """Train, evaluate and publish a bundle under `config.out/<version>`; returns its directory."""
    labels = _labels(config)
    classes = labels.names
    parts = split(config.data)
    train_set, cal_set, test_set = parts["train"], parts["calibration"], parts["test"]
    y_train = np.array([classes.index(y) for y in train_set.labels])
    y_cal = np.array([classes.index(y) for y in cal_set.labels])

    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_ensure(config.out)))
    oof: dict[str, np.ndarray] = {}
    cal: dict[str, np.ndarray] = {}
    components: dict[str, str] = {}
    shutil.copyfile(config.labels, staging / "labels.yaml") if config.labels else _dump_labels(labels, staging)
    if config.slices:
        SliceConfig.load(config.slices)
        shutil.copyfile(config.slices, staging / "slices.yaml")
    if config.rules:
        progress("regex rules")
        engine = RuleEngine(load_rules(config.rules, labels), labels)
        shutil.copyfile(config.rules, staging / "rules.yaml")
        components["regex"] = f"rules-{engine.version}"
        # rules are not fitted, so their train outputs are already out-of-fold
        oof["regex"] = opinions_matrix(engine.predict(train_set.texts), classes)
        cal["regex"] = opinions_matrix(engine.predict(cal_set.texts), classes)

    progress("classical voters: fit on train (calibration method chosen on held-out ECE)")
    model = ClassicalModel().fit(train_set.texts, train_set.labels)
    progress(f"classical voters: {config.folds}-fold out-of-fold outputs")
    oof.update(
        _reorder(model.oof_proba(train_set.texts, train_set.labels, n_splits=config.folds, seed=0), model, classes)
    )
    cal.update(_reorder(model.predict_proba_all(cal_set.texts), model, classes))
    joblib.dump(model, staging / "classical.joblib")

    progress("arbiter: pool on out-of-fold outputs, threshold on calibration")
    version = new_version(config.data.sha256())
    components["classical"] = f"classical-{version}"
    policy = fit_policy(
        oof, y_train, cal, y_cal, classes, harm_weights(labels), config.target_error, version=f"arbiter-{version}"
    )
    components["arbiter"] = policy.version
    (staging / "arbiter.json").write_text(json.dumps(policy.to_dict(), indent=1), encoding="utf-8")

    manifest = Manifest(
        name=config.name,
        version=version,
        data_sha256=config.data.sha256(),
        components=components,
        config={
            "target_error": config.target_error,
            "folds": config.folds,
            "splits": {k: len(v) for k, v in parts.items()},
        },
    )
    write_manifest(staging, manifest)
    progress("evaluate on the test split")
    metrics = evaluate(staging, test_set)
    metrics["calibration"] = policy.calibration_report
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    (staging / "model_card.md").write_text(model_card(manifest, metrics), encoding="utf-8")
    write_manifest(staging, manifest.model_copy(update={"metrics": _headline(metrics)}))
    return publish_dir(staging, config.out, version)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dump_labels(labels: LabelConfig, staging: Path) -> None:
    import yaml

    (staging / "labels.yaml").write_text(yaml.safe_dump(labels.model_dump(), sort_keys=False), encoding="utf-8")


def _reorder(probs: dict[str, np.ndarray], model: ClassicalModel, classes: list[str]) -> dict[str, np.ndarray]:
    """Columns in the label config's order (the model's are sorted)."""
    idx = [model.classes_.index(c) if c in model.classes_ else -1 for c in classes]
    out = {}
    for voter, p in probs.items():
        cols = [p[:, i] if i >= 0 else np.zeros(len(p)) for i in idx]
        out[voter] = np.stack(cols, axis=1)
    return out


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    ens = metrics["ensemble"]
    return {k: ens.get(k) for k in ("macro_f1", "ece", "coverage", "selective_error")}


def model_card(manifest: Manifest, metrics: dict[str, Any]) -> str:
    """A short human-readable description of the bundle."""
    rows = [
        f"| {name} | {r['macro_f1']:.3f} | {r['ece']:.3f} | {r['coverage']:.3f} | {r['selective_error']:.3f} |"
        for name, r in [*metrics["voters"].items(), ("**ensemble**", metrics["ensemble"])]
        if r.get("macro_f1") is not None
    ]
    return "\n".join(
        [
            f"# Model card: {manifest.name} {manifest.version}",
            "",
            f"Data sha256 `{manifest.data_sha256}`; splits {manifest.config.get('splits')}.",
            f"Components: {manifest.components}.",
            "",
            "Test-split quality (macro-F1 and ECE on answered texts):",
            "",
            "| model | macro-F1 | ECE | coverage | selective error |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
