"""Embedding voter service: a sentence encoder + calibrated head voting as `minilm`; its bundle part and training.

By default it runs as a cascade voter: it votes only when the arbiter asks (`VoteRequested` naming it),
since embedding a text costs 10–100× a TF-IDF prediction. `FLOCKWATCH_EMBEDDING_MODE=always` votes on
every text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import joblib
import numpy as np
from flockwatch.classical_voter.embedding import CachedEncoder, EmbeddingHead, EmbeddingModel
from flockwatch.classical_voter.encoder import describe, load_sentence_encoder, locate
from flockwatch.classical_voter.settings import EmbeddingSettings
from flockwatch.common.artifacts import ArtifactError, load_joblib, load_json, read_manifest
from flockwatch.common.bus import Bus
from flockwatch.common.service import VoterCore, VoterService
from flockwatch.common.settings import CommonSettings
from flockwatch.common.voting import Opinion
from numpy.typing import NDArray

ARTIFACT = "embedding.joblib"  # the fitted head only
INFO = "embedding.json"  # voter name, classes, calibration, and the encoder (name, path, sha256, package)


class EmbeddingCore(VoterCore):
    """The loaded encoder and head under the voter's name."""

    def __init__(self, model: EmbeddingModel, version: str, encoder_sha256: str) -> None:
        self.model = model
        self.version = version
        self.voters = (model.voter,)
        self.encoder_sha256 = encoder_sha256

    def predict(self, texts: Sequence[str]) -> dict[str, list[Opinion]]:
        return self.model.predict(list(texts))


def save(model: EmbeddingModel, encoder: dict[str, Any], directory: Path, report: dict[str, Any]) -> list[str]:
    """Write the head and its description (with the encoder's record); returns the file names written."""
    directory.mkdir(parents=True, exist_ok=True)
    joblib.dump(model.head, directory / ARTIFACT)
    info = {
        "voter": model.voter,
        "classes": model.classes,
        "encoder": encoder,
        "calibration": model.head.choice_,
        "head": {"model": "LogisticRegression", "C": model.head.c},
        "report": report,
    }
    (directory / INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return [ARTIFACT, INFO]


def load_core(
    model_dir: Path, settings: EmbeddingSettings | None = None, previous: EmbeddingCore | None = None
) -> EmbeddingCore | None:
    """The bundle's embedding voter (head sha256-verified, encoder matched by sha256), or None when it has none.

    `previous`: the core loaded before; its encoder (and embedding cache) is kept when the bundle records the
    same encoder.
    """
    settings = settings or EmbeddingSettings()
    manifest = read_manifest(model_dir, verify=False)
    if INFO not in manifest.files:
        return None
    info = load_json(model_dir, INFO)
    head = load_joblib(model_dir, ARTIFACT)
    if not isinstance(head, EmbeddingHead):
        raise ArtifactError(f"{model_dir}/{ARTIFACT} does not hold an EmbeddingHead")
    record = info["encoder"]
    if previous is not None and previous.encoder_sha256 == record["sha256"] and settings.embedding_encoder is None:
        encoder = previous.model.encoder
    else:
        embed = load_sentence_encoder(locate(record, settings.embedding_encoder), settings.embedding_batch_size)
        encoder = CachedEncoder(embed, cache_size=settings.embedding_cache_size)
    model = EmbeddingModel(encoder, head, info["voter"])
    return EmbeddingCore(model, manifest.components.get(model.voter, manifest.version), record["sha256"])


class EmbeddingVoterService(VoterService):
    """Votes as `minilm`: on the arbiter's VoteRequested (cascade, the default) or on every text (always)."""

    name = "embedding_voter"

    def __init__(self, bus: Bus, settings: CommonSettings) -> None:
        own = settings if isinstance(settings, EmbeddingSettings) else EmbeddingSettings(**settings.model_dump())
        super().__init__(bus, own, mode=own.embedding_mode)

    def load(self, model_dir: Path) -> VoterCore | None:
        previous = self.core if isinstance(self.core, EmbeddingCore) else None
        return load_core(model_dir, cast(EmbeddingSettings, self.settings), previous)


@dataclass
class EmbeddingFit:
    """What training hands the arbiter: out-of-fold train and calibration probabilities (`classes` order)."""

    classes: list[str]
    oof: NDArray[np.float64]
    cal: NDArray[np.float64]
    report: dict[str, Any]


def train_embedding(
    encoder_folder: Path,
    train: tuple[Sequence[str], Sequence[str]],
    cal_texts: Sequence[str],
    out: Path,
    folds: int = 5,
    batch_size: int = 32,
    progress: Callable[[str], None] = lambda _: None,
) -> EmbeddingFit:
    """Embed train and calibration once, fit the head, K-fold out-of-fold on train, and save to `out`."""
    texts, labels = train
    record = describe(encoder_folder)
    start = time.perf_counter()
    embed = load_sentence_encoder(encoder_folder, batch_size)
    encoder = CachedEncoder(embed, batch_size=1024, cache_size=len(texts) + len(cal_texts))
    load_s = time.perf_counter() - start
    progress(f"embedding voter: embed {len(texts) + len(cal_texts)} train and calibration texts ({record['name']})")
    start, cpu = time.perf_counter(), time.process_time()
    encoder.encode([*texts, *cal_texts])
    embed_s, embed_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    progress(f"embedding voter: calibrated head, {folds}-fold out-of-fold outputs")
    start = time.perf_counter()
    model = EmbeddingModel(encoder, EmbeddingHead()).fit(texts, labels)
    oof = model.oof_proba(texts, labels, n_splits=folds, seed=0)
    cal = model.predict_proba(cal_texts)
    n = max(1, len(encoder.cache))
    report = {
        "encoder": record["name"],
        "n_train": len(texts),
        "n_embedded": len(encoder.cache),
        "encoder_load_seconds": round(load_s, 2),
        "embed_seconds": round(embed_s, 2),
        "embed_ms_per_text": round(embed_s * 1000 / n, 2),
        "embed_cpu_ms_per_text": round(embed_cpu_s * 1000 / n, 2),
        "head_seconds": round(time.perf_counter() - start, 2),
        "calibration": model.head.choice_,
    }
    save(model, record, out, report)
    return EmbeddingFit(model.classes, oof, cal, report)
