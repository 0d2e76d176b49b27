"""`flockwatch train`, `eval` and `rules test` on data a user brings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from flockwatch.cli.main import app
from flockwatch.common.artifacts import ArtifactError, read_manifest
from typer.testing import CliRunner

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_train_and_eval_on_a_users_jsonl_without_rules(tmp_path: Path, data_files: dict[str, Path]) -> None:
    frame = pd.read_csv(data_files["trec"]).sample(900, random_state=0)
    data = tmp_path / "questions.jsonl"
    frame.rename(columns={"text": "question", "label": "kind"}).to_json(data, orient="records", lines=True)
    runner = CliRunner()
    trained = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(data),
            "--text-col",
            "question",
            "--label-col",
            "kind",
            "--out",
            str(tmp_path / "models"),
            "--no-finetune",  # the frozen encoder: the fine-tuned one is tested in test_finetune_voter (minutes here)
        ],
    )
    assert trained.exit_code == 0, trained.output
    bundle = tmp_path / "models" / "current"
    manifest = read_manifest(bundle)  # every file's sha256 verified
    assert "rules.yaml" not in manifest.files  # no rules for this data: no regex voter
    evaluated = runner.invoke(
        app,
        [
            "eval",
            "--models",
            str(bundle),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "eval"),
            "--text-col",
            "question",
            "--label-col",
            "kind",
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["voters"]) == {"tfidf_lr", "tfidf_svm", "minilm"}  # minilm: on by default
    for report in metrics["voters"].values():
        assert 0.3 < report["macro_f1"] <= 1 and 0 <= report["ece"] < 0.3
        assert set(report["per_class_f1"]) == {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}
    ensemble = metrics["ensemble"]  # forced answers on every text, and the risk-controlled answers
    assert 0.3 < ensemble["macro_f1_all"] <= 1 and 0 <= ensemble["ece"] < 0.3
    assert 0 <= ensemble["coverage"] <= 1 and (ensemble["coverage"] == 0) == (ensemble["macro_f1"] is None)
    assert (tmp_path / "eval" / "report.md").stat().st_size > 0
    assert {p.name for p in (tmp_path / "eval").glob("*.png")} >= {"reliability.png", "risk_coverage.png"}


def test_a_tampered_bundle_is_refused(tmp_path: Path, sms_bundle: Path) -> None:
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(sms_bundle, copy)
    (copy / "arbiter.json").write_text((copy / "arbiter.json").read_text().replace("0", "1", 1))
    with pytest.raises(ArtifactError, match="arbiter.json"):
        read_manifest(copy)


def test_missing_column_is_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("body,label\nhello,a\n")
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "missing column" in result.output


def test_rules_test_shows_which_rules_fire() -> None:
    result = CliRunner().invoke(
        app,
        [
            "rules",
            "test",
            str(CONFIGS / "sms" / "rules.yaml"),
            "WINNER! Claim your prize now, call 09061701461",
            "--labels",
            str(CONFIGS / "sms" / "labels.yaml"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "spam-premium-number" in result.output and "spam" in result.output


def test_the_embedding_voter_is_on_by_default_and_can_be_turned_off(tmp_path: Path) -> None:
    from flockwatch.classical_voter.encoder import EncoderError, packaged_minilm
    from flockwatch.cli.main import _encoder

    assert _encoder(None, None, False) == packaged_minilm()
    assert _encoder(False, None, False) is None
    assert _encoder(False, None, True) == packaged_minilm()  # --finetune implies the voter
    with pytest.raises(EncoderError, match="not a sentence-transformers folder"):
        _encoder(None, tmp_path, False)


@pytest.mark.parametrize(
    ("flags", "embedding", "finetune"),
    [([], True, True), (["--no-finetune"], True, False), (["--no-embedding"], False, False)],
)
def test_default_train_fine_tunes_the_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], embedding: bool, finetune: bool
) -> None:
    from flockwatch.trainer import pipeline

    seen = []

    def capture(config: Any, progress: Any) -> Path:
        seen.append(config)
        raise ValueError("stopped before training")

    monkeypatch.setattr(pipeline, "train", capture)
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(20)))
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "m"), *flags])
    assert result.exit_code == 2 and "stopped before training" in result.output
    assert (seen[0].embedding is not None) == embedding
    assert (seen[0].finetune is not None) == finetune
