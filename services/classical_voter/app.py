"""Classical voter service: TF-IDF + calibrated linear models, one vote per model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flockwatch.classical_voter.model import ClassicalModel
from flockwatch.common.artifacts import load_joblib, read_manifest
from flockwatch.common.service import VoterCore, VoterService
from flockwatch.common.voting import Opinion

ARTIFACT = "classical.joblib"


class ClassicalCore(VoterCore):
    """The fitted models under their voter names (tfidf_lr, tfidf_svm)."""

    def __init__(self, model: ClassicalModel, version: str) -> None:
        self.model = model
        self.version = version
        self.voters = tuple(model.voters_)

    def predict(self, texts: Sequence[str]) -> dict[str, list[Opinion]]:
        return self.model.predict(list(texts))


def load_core(model_dir: Path) -> ClassicalCore | None:
    """The bundle's classical models (sha256-verified before unpickling), or None."""
    manifest = read_manifest(model_dir, verify=False)
    if ARTIFACT not in manifest.files:
        return None
    model = load_joblib(model_dir, ARTIFACT)
    if not isinstance(model, ClassicalModel):
        raise TypeError(f"{model_dir}/{ARTIFACT} does not hold a ClassicalModel")
    return ClassicalCore(model, manifest.components.get("classical", manifest.version))


class ClassicalVoterService(VoterService):
    """Votes with the TF-IDF models."""

    name = "classical_voter"

    def load(self, model_dir: Path) -> ClassicalCore | None:
        return load_core(model_dir)
