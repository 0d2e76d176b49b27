"""Embedding voter service: a sentence encoder + calibrated head voting as `minilm`; its bundle part and training.

One voter, two kinds of bundle part: a frozen encoder with a calibrated logistic-regression head
(`embedding.skops`, the default), or the encoder fine-tuned end to end with a linear head
(`embedding.safetensors`, temperature-scaled; `finetune.py`). By default it runs as a cascade voter: it votes
only when the arbiter asks (`VoteRequested` naming it), since encoding a text costs 10–100× a TF-IDF
prediction. `FLOCKWATCH_EMBEDDING_MODE=always` votes on every text.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from flockwatch.classical_voter.app import calibration_types
from flockwatch.classical_voter.embedding import (
    VOTER,
    CachedEncoder,
    EmbeddingHead,
    EmbeddingModel,
    TemperatureHead,
)
from flockwatch.classical_voter.encoder import describe, load_sentence_encoder, locate
from flockwatch.classical_voter.settings import EmbeddingSettings
from flockwatch.common.artifacts import (
    ArtifactError,
    Manifest,
    dump_skops,
    load_json,
    load_skops,
    read_manifest,
)
from flockwatch.common.bus import Bus
from flockwatch.common.metrics import expected_calibration_error
from flockwatch.common.service import VoterCore, VoterService
from flockwatch.common.settings import CommonSettings
from flockwatch.common.voting import Opinion
from numpy.typing import NDArray
from scipy.special import softmax
from sklearn.metrics import f1_score

if TYPE_CHECKING:  # torch loads only when a fine-tuned encoder is trained or loaded
    from flockwatch.classical_voter.finetune import FinetuneConfig, FineTunedEncoder

ARTIFACT = "embedding.skops"  # the frozen encoder's fitted head only
INFO = "embedding.json"  # voter name, kind, classes, calibration, and the encoder (name, path, sha256, package)
WEIGHTS = "embedding.safetensors"  # a fine-tuned encoder and its linear head (no pickle)
FROZEN_BATCH = 32  # texts per forward pass of a frozen sentence-transformers encoder, unless configured
LOGITS_PER_CALL = 256  # texts per call of a fine-tuned encoder (each call sorts by length, then forward passes)


class EmbeddingCore(VoterCore):
    """The loaded encoder and head under the voter's name."""

    def __init__(self, model: EmbeddingModel, version: str, encoder_sha256: str) -> None:
        self.model = model
        self.version = version
        self.voters = (model.voter,)
        self.encoder_sha256 = encoder_sha256

    def predict(self, texts: Sequence[str]) -> dict[str, list[Opinion]]:
        return self.model.predict(list(texts))


def head_types() -> list[type]:
    """What embedding.skops may hold beyond what skops trusts by default (scikit-learn's estimators)."""
    return [EmbeddingHead, *calibration_types()]


def save(model: EmbeddingModel, encoder: dict[str, Any], directory: Path, report: dict[str, Any]) -> list[str]:
    """Write the head and its description (with the encoder's record); returns the file names written."""
    directory.mkdir(parents=True, exist_ok=True)
    dump_skops(model.head, directory / ARTIFACT)
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
    """The bundle's embedding voter (its files sha256-verified, the base encoder matched by sha256), or None
    when it has none.

    `previous`: the core loaded before; its encoder (and embedding cache) is kept when the bundle records the
    same encoder (frozen), or the same fine-tuned weights served the same way (fine-tuned: the cache holds
    logits, so a new temperature alone keeps it).
    """
    settings = settings or EmbeddingSettings()
    manifest = read_manifest(model_dir, verify=False)
    if INFO not in manifest.files:
        return None
    info = load_json(model_dir, INFO)
    if settings.embedding_threads is not None:
        import torch

        torch.set_num_threads(settings.embedding_threads)  # process-wide: the voter's forward passes
    if info.get("kind") == "finetuned":
        return _load_finetuned(model_dir, manifest, info, settings, previous)
    head = load_skops(model_dir, ARTIFACT, head_types())
    if not isinstance(head, EmbeddingHead):
        raise ArtifactError(f"{model_dir}/{ARTIFACT} does not hold an EmbeddingHead")
    record = info["encoder"]
    if previous is not None and previous.encoder_sha256 == record["sha256"] and settings.embedding_encoder is None:
        encoder = previous.model.encoder
    else:
        folder = locate(record, settings.embedding_encoder)
        embed = load_sentence_encoder(folder, settings.embedding_batch_size or FROZEN_BATCH)
        encoder = CachedEncoder(embed, cache_size=settings.embedding_cache_size)
    model = EmbeddingModel(encoder, head, info["voter"])
    return EmbeddingCore(model, manifest.components.get(model.voter, manifest.version), record["sha256"])


def save_finetuned(
    model: FineTunedEncoder, encoder: dict[str, Any], config: FinetuneConfig, directory: Path, report: dict[str, Any]
) -> list[str]:
    """Write a fine-tuned encoder: safetensors weights (in `config.dtype`) and its description; file names."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(model.state_tensors(config.dtype), str(directory / WEIGHTS), metadata={"format": "pt"})
    params = {k: v for k, v in model.get_params().items() if k not in ("encoder", "threads")}
    info = {
        "voter": VOTER,
        "kind": "finetuned",
        "classes": model.classes_,
        "temperature": model.temperature_,
        "encoder": encoder,  # the base: its tokenizer and architecture, found again and checked by sha256
        "params": params,
        "weights": {"file": WEIGHTS, "dtype": config.dtype},
        "serve": {"quantize": config.quantize},  # how the outputs handed to the stacker were computed
        "config": config.model_dump(),
        "report": report,
    }
    (directory / INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return [WEIGHTS, INFO]


def _verified_bytes(model_dir: Path, manifest: Manifest, rel: str) -> bytes:
    """A bundle file's bytes, refused unless they hash to the manifest's sha256 (the bytes checked are loaded)."""
    data = (Path(model_dir) / rel).read_bytes() if (Path(model_dir) / rel).is_file() else None
    if rel not in manifest.files or data is None or hashlib.sha256(data).hexdigest() != manifest.files[rel]:
        raise ArtifactError(f"{model_dir}: {rel} is missing or does not match its manifest sha256")
    return data


def _load_finetuned(
    model_dir: Path,
    manifest: Manifest,
    info: dict[str, Any],
    settings: EmbeddingSettings,
    previous: EmbeddingCore | None,
) -> EmbeddingCore:
    """A fine-tuned bundle part: weights verified, rebuilt on the recorded base encoder, int8 as configured."""
    from flockwatch.classical_voter.finetune import FineTunedEncoder
    from safetensors.torch import load

    tensors = load(_verified_bytes(model_dir, manifest, WEIGHTS))
    quantize = info["serve"]["quantize"] if settings.embedding_quantize is None else settings.embedding_quantize
    batch = settings.embedding_batch_size or int(info["params"]["infer_batch_size"])
    backend = settings.embedding_backend
    identity = f"{manifest.files[WEIGHTS]}:{backend}:{'int8' if quantize else 'fp32'}:{batch}"
    if previous is not None and previous.encoder_sha256 == identity and settings.embedding_encoder is None:
        encoder = previous.model.encoder
    else:
        net = FineTunedEncoder.from_state(tensors, info, locate(info["encoder"], settings.embedding_encoder))
        net.infer_batch_size = batch
        logits = net.predict_logits
        if backend == "onnxruntime":
            from flockwatch.classical_voter.finetune_onnx import OnnxLogits

            logits = OnnxLogits(net, quantize, settings.embedding_threads).predict_logits
        elif quantize:
            net.quantize()
        encoder = CachedEncoder(logits, LOGITS_PER_CALL, cache_size=settings.embedding_cache_size)
    model = EmbeddingModel(encoder, TemperatureHead(info["classes"], info["temperature"]), info["voter"])
    return EmbeddingCore(model, manifest.components.get(model.voter, manifest.version), identity)


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
    finetune: FinetuneConfig | None = None,
) -> EmbeddingFit:
    """Embed train and calibration once, fit the head, K-fold out-of-fold on train, and save to `out`.

    With `finetune`: the encoder is fine-tuned instead (`finetune.folds` fold models, not `folds`; see
    `train_finetuned`).
    """
    if finetune is not None:
        return train_finetuned(encoder_folder, train, cal_texts, out, finetune, progress)
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


def train_finetuned(
    encoder_folder: Path,
    train: tuple[Sequence[str], Sequence[str]],
    cal_texts: Sequence[str],
    out: Path,
    config: FinetuneConfig,
    progress: Callable[[str], None] = lambda _: None,
) -> EmbeddingFit:
    """Cross-fit: out-of-fold probabilities for every train text (temperature fitted on them), the final model
    (every train text) saved to `out`, its probabilities on the calibration texts; all as the service scores."""
    from flockwatch.classical_voter.finetune_cv import cross_fit

    texts, labels = train
    record = describe(encoder_folder)
    fit = cross_fit(config, texts, labels, Path(record["path"]), progress)
    final = fit.final
    y = np.array([fit.classes.index(label) for label in labels])
    oof = final.proba_from_logits(fit.oof_logits)
    raw = softmax(fit.oof_logits.astype(np.float64), axis=1)
    report = {
        "kind": "finetuned",
        "encoder": record["name"],
        "n_train": len(texts),
        "folds": config.folds,
        "epochs": config.epochs,
        "fold_epochs": config.fold_epochs or config.epochs,
        "max_length": config.max_length,
        "layers": config.layers,
        "workers": fit.workers,
        "train_seconds": fit.seconds,
        "temperature": round(fit.temperature, 4),
        "oof_macro_f1": round(float(f1_score(y, oof.argmax(axis=1), average="macro")), 4),
        "oof_ece": round(expected_calibration_error(oof, y), 4),
        "oof_ece_before_temperature": round(expected_calibration_error(raw, y), 4),
        "oof_nll": round(float(-np.log(np.clip(oof[np.arange(len(y)), y], 1e-12, None)).mean()), 4),
        "oof_nll_before_temperature": round(float(-np.log(np.clip(raw[np.arange(len(y)), y], 1e-12, None)).mean()), 4),
        "dtype": config.dtype,
        "quantize": config.quantize,
    }
    progress(f"embedding voter: fine-tuned, out-of-fold macro-F1 {report['oof_macro_f1']}, T={fit.temperature:.2f}")
    save_finetuned(final, record, config, out, report)
    if config.quantize:
        final.quantize()
    start, cpu = time.perf_counter(), time.process_time()
    cal = final.predict_proba(cal_texts)
    if len(cal_texts):
        report["cal_ms_per_text"] = round((time.perf_counter() - start) * 1000 / len(cal_texts), 2)
        report["cal_cpu_ms_per_text"] = round((time.process_time() - cpu) * 1000 / len(cal_texts), 2)
    return EmbeddingFit(fit.classes, oof, cal, report)
