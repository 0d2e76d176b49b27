"""The trainer's data merge (corrections over base data, held-out without leaks) and the model registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flockwatch.common.artifacts import ArtifactError, Manifest, read_manifest, write_manifest
from flockwatch.common.datasets import CALIBRATION_FRACTION, TEST_FRACTION, Dataset, hold_out, split_of
from flockwatch.trainer import registry
from flockwatch.trainer.data import held_out, merge, recalibration_pool, scrub_key

BASE = Dataset(
    [f"ordinary message number {i}" for i in range(200)] + ["my name is John, call me later"],
    ["ham"] * 200 + ["ham"],
)


def test_a_correction_relabels_its_base_text_even_when_scrubbed() -> None:
    scrubbed = "my name is <NAME>, call me later"
    assert scrub_key("my name is John, call me later") == scrub_key(scrubbed)
    run = merge(BASE, [(scrubbed, "spam"), ("brand new text", "spam")])
    labels = dict(zip(run.data.texts, run.data.labels, strict=True))
    assert labels["my name is John, call me later"] == "spam"  # the base text keeps its form (and split)
    assert labels["brand new text"] == "spam"
    assert scrubbed not in labels
    assert run.report == {"base": 201, "corrections": 2, "relabelled": 1, "confirmed": 0, "added": 1, "rows": 202}


def test_held_out_labels_from_corrections_are_not_reference() -> None:
    test_text = next(t for t in BASE.texts if split_of(t) == "test")
    held = held_out(merge(BASE, [(test_text, "spam")]))
    assert all(split_of(t) == "test" for t in held.data.texts)
    assert not held.reference[held.data.texts.index(test_text)]
    assert held.reference.sum() == len(held.data) - 1


def test_a_test_text_whose_scrubbed_form_was_trained_on_is_not_held_out() -> None:
    """Copies that differ only in a name hash into different splits but scrub to one text."""
    names = ["John", "Mary", "Peter", "Anna", "Tom", "Kate", "Mike", "Lucy", "Paul", "Emma", "Olga", "Ivan"]
    names += ["Sara", "Liam", "Noah", "Ella", "Jack", "Ruth", "Owen", "Iris"]
    copies = [f"my name is {n}, see you at the station" for n in names]
    splits = {split_of(t) for t in copies}
    assert {"test"} < splits  # the precondition: some copies in test, some elsewhere
    held = held_out(merge(Dataset(BASE.texts + copies, BASE.labels + ["ham"] * len(copies)), []))
    assert not set(copies) & set(held.data.texts)
    assert held.dropped_leaks == sum(split_of(t) == "test" for t in copies)


def test_the_recalibration_pool_never_takes_test_texts() -> None:
    recent = [(t, "spam") for t in BASE.texts[:60]]
    run = merge(BASE, recent)
    fit, cal = recalibration_pool(run, recent)
    pool = fit.texts + cal.texts
    assert not any(split_of(t) == "test" for t in pool)
    assert {t for t, _ in recent if split_of(t) == "train"} <= set(pool)
    assert fit.texts and cal.texts and not set(fit.texts) & set(cal.texts)


def test_a_cross_fitted_champion_recalibrates_on_recent_corrections_only() -> None:
    """Its voters trained on the calibration split too: only corrections newer than it are out of sample."""
    recent = [(t, "spam") for t in BASE.texts[:120]]
    run = merge(BASE, recent)
    fit, cal = recalibration_pool(run, recent, calibration_held_out=False)
    pool = set(fit.texts + cal.texts)
    assert pool == {t for t, _ in recent if split_of(t) != "test"}
    with pytest.raises(ValueError, match="cross-fitted"):
        recalibration_pool(run, recent[:20], calibration_held_out=False)


def test_the_fixed_split_is_what_train_holds_out() -> None:
    """`flockwatch train --test-frac 0.25 --calibration holdout` holds out the trainer's test and calibration."""
    kept, test = hold_out(BASE, TEST_FRACTION, "test")
    train, cal = hold_out(kept, CALIBRATION_FRACTION, "calibration")
    assert {t: "test" for t in test.texts} | {t: "calibration" for t in cal.texts} | {
        t: "train" for t in train.texts
    } == {t: split_of(t) for t in BASE.texts}
    assert 0.15 < len(test) / len(BASE) < 0.35


def _bundle(root: Path, version: str, parent: str | None = None) -> Path:
    d = root / ".runs" / version
    d.mkdir(parents=True)
    (d / "weights.bin").write_bytes(version.encode())
    (d / "metrics.json").write_text(json.dumps({"ensemble": {"macro_f1": 0.9}}))
    (d / "model_card.md").write_text(f"# Model card: {version}\n")
    write_manifest(d, Manifest(name="sms", version=version, parent=parent, metrics={"macro_f1": 0.9, "ece": 0.01}))
    return d


def _gate(passed: bool) -> dict[str, object]:
    return {"passed": passed, "reasons": [] if passed else ["macro_f1"], "kind": "full", "n": 10, "checks": []}


def test_promote_finalize_rollback_and_history(tmp_path: Path) -> None:
    root = tmp_path / "sms"
    first = registry.promote(root, _bundle(root, "v1"), run_id="r1")
    candidate = _bundle(root, "v2")
    manifest = registry.finalize(candidate, parent="v1", gate=_gate(True), lineage={"run_id": "r2", "kind": "full"})
    assert manifest.parent == "v1" and manifest.metrics["gate"]["passed"] is True
    assert json.loads((candidate / "metrics.json").read_text())["gate"]["passed"] is True
    assert "Parent: v1" in (candidate / "model_card.md").read_text()
    second = registry.promote(root, candidate, run_id="r2")
    read_manifest(second, verify=True)  # finalize re-hashed every file it touched
    assert registry.current_version(root) == "v2" and (root / "current").resolve() == second.resolve()
    registry.rollback(root, "v1", by="test")
    assert registry.current_version(root) == "v1"
    actions = [(e["action"], e["version"], e.get("previous")) for e in registry.history(root)]
    assert actions == [("publish", "v1", None), ("publish", "v2", "v1"), ("rollback", "v1", "v2")]
    assert [m.version for m in registry.versions(root)] == ["v1", "v2"]
    event = registry.announcement(first)
    assert (
        event.version == "v1" and event.path == str(first.resolve()) and event.metrics == {"macro_f1": 0.9, "ece": 0.01}
    )
    assert registry.announcement(first).message_id != event.message_id  # a re-announcement is a new event


def test_rollback_refuses_a_tampered_or_unknown_version(tmp_path: Path) -> None:
    root = tmp_path / "sms"
    registry.promote(root, _bundle(root, "v1"))
    registry.promote(root, _bundle(root, "v2"))
    (root / "v1" / "weights.bin").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="sha256"):
        registry.rollback(root, "v1")
    with pytest.raises(ArtifactError):
        registry.rollback(root, "../v2")
    assert registry.current_version(root) == "v2"
