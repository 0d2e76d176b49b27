"""Classical voter service: TF-IDF + calibrated linear models, one vote per model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flockwatch.classical_voter.model import ClassicalModel
from flockwatch.common.artifacts import dump_skops, has_skops, load_skops, read_manifest
from flockwatch.common.service import VoterCore, VoterService
from flockwatch.common.voting import Opinion

ARTIFACT = "classical.skops"


def calibration_types() -> list[type]:
    """What a fitted `CalibratedClassifierCV` holds beyond what skops trusts by default: its per-fold calibrated
    classifiers, sigmoid or isotonic calibration (IsotonicRegression is public, trusted already), its folds."""
    from sklearn.calibration import _CalibratedClassifier, _SigmoidCalibration
    from sklearn.model_selection import StratifiedKFold

    return [_CalibratedClassifier, _SigmoidCalibration, StratifiedKFold]


def trusted_types() -> list[type]:
    """What a classical.skops may hold beyond what skops trusts by default (scikit-learn's estimators)."""
    return [ClassicalModel, *calibration_types()]


def save(model: ClassicalModel, directory: Path) -> str:
    """Write the fitted models (skops); returns the file name."""
    dump_skops(model, directory / ARTIFACT)
    return ARTIFACT


class ClassicalCore(VoterCore):
    """The fitted models under their voter names (tfidf_lr, tfidf_svm)."""

    def __init__(self, model: ClassicalModel, version: str) -> None:
        self.model = model
        self.version = version
        self.voters = tuple(model.voters_)

    def predict(self, texts: Sequence[str]) -> dict[str, list[Opinion]]:
        return self.model.predict(list(texts))


def load_core(model_dir: Path) -> ClassicalCore | None:
    """The bundle's classical models (sha256-verified, rebuilt from skops with an allow-list of types), or None."""
    manifest = read_manifest(model_dir, verify=False)
    if not has_skops(model_dir, manifest, ARTIFACT):
        return None
    model = load_skops(model_dir, ARTIFACT, trusted_types())
    if not isinstance(model, ClassicalModel):
        raise TypeError(f"{model_dir}/{ARTIFACT} does not hold a ClassicalModel")
    return ClassicalCore(model, manifest.components.get("classical", manifest.version))


class ClassicalVoterService(VoterService):
    """Votes with the TF-IDF models."""

    name = "classical_voter"

    def load(self, model_dir: Path) -> ClassicalCore | None:
        return load_core(model_dir)
