"""Model artifacts: every file is checked against its manifest sha256 before it is loaded."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from flockwatch.common.artifacts import (
    ArtifactError,
    Manifest,
    dump_skops,
    has_skops,
    load_skops,
    read_manifest,
    write_manifest,
)


class Planted:
    """An object whose rebuilding runs code (it creates a marker directory): what a hostile bundle would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, int]]:  # as a pickle
        return (os.makedirs, (self.marker, 0o755))

    def __setstate__(self, state: dict[str, str]) -> None:  # as a skops object of a trusted type
        os.makedirs(state["marker"])


def bundle(directory: Path, obj: object = None, name: str = "model.skops") -> Path:
    """A bundle holding `obj` (skops) under `name`, its manifest consistent with it."""
    directory.mkdir()
    dump_skops({"weights": np.array([1.0, 2.0])} if obj is None else obj, directory / name)
    write_manifest(directory, Manifest(name="t", version="v1"))
    return directory


def test_a_file_whose_sha256_differs_is_refused_before_it_is_read(tmp_path: Path) -> None:
    directory = bundle(tmp_path / "b")
    assert load_skops(directory, "model.skops", [])["weights"].tolist() == [1.0, 2.0]
    marker = tmp_path / "pwned"
    dump_skops(Planted(marker), directory / "model.skops")
    with pytest.raises(ArtifactError, match="model.skops does not match its manifest sha256"):
        load_skops(directory, "model.skops", [Planted])
    assert not marker.exists()
    with pytest.raises(ArtifactError, match=r"model.skops has sha256 \w+…, manifest says"):
        read_manifest(directory)


def test_a_consistent_bundle_is_still_rebuilt_only_from_allowed_types(tmp_path: Path) -> None:
    """Hashes prove integrity, not origin: a bundle whose manifest matches its hostile file is refused by the
    types the file names, before anything in it is constructed; trusting the type would have run its code."""
    marker = tmp_path / "pwned"
    directory = bundle(tmp_path / "b", Planted(marker))
    with pytest.raises(
        ArtifactError, match=r"outside its allow-list, refused unloaded: \['tests.unit.test_artifacts.Planted'\]"
    ):
        load_skops(directory, "model.skops", [])
    assert not marker.exists()
    load_skops(directory, "model.skops", [Planted])  # what the allow-list stands between
    assert marker.exists()


def test_a_pickle_is_not_read_as_a_model(tmp_path: Path) -> None:
    """A pickle under a skops name is not read (unpickling would run it); a bundle naming a pickle is refused."""
    marker = tmp_path / "pwned"
    directory = tmp_path / "b"
    directory.mkdir()
    (directory / "model.skops").write_bytes(pickle.dumps(Planted(marker)))
    (directory / "classical.joblib").write_bytes(pickle.dumps(Planted(marker)))
    manifest = write_manifest(directory, Manifest(name="t", version="v1"))
    with pytest.raises(ArtifactError, match="not a readable skops file"):
        load_skops(directory, "model.skops", [Planted])
    with pytest.raises(ArtifactError, match="classical.joblib is a pickle"):
        has_skops(directory, manifest, "classical.skops")
    with pytest.raises(ArtifactError, match="classical.joblib is a pickle"):  # a required part: the same refusal
        load_skops(directory, "classical.skops", [])
    assert not marker.exists()


def test_a_file_missing_from_the_bundle_or_from_the_manifest_is_refused(tmp_path: Path) -> None:
    directory = bundle(tmp_path / "b")
    (directory / "extra.skops").write_bytes(b"not listed")
    with pytest.raises(ArtifactError, match="extra.skops is not in the manifest"):
        load_skops(directory, "extra.skops", [])
    (directory / "model.skops").unlink()
    with pytest.raises(ArtifactError, match="model.skops is listed in the manifest but missing"):
        read_manifest(directory)
