"""Model artifacts: every file is checked against its manifest sha256 before it is loaded."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import joblib
import pytest
from flockwatch.common.artifacts import ArtifactError, Manifest, load_joblib, read_manifest, write_manifest


class Planted:
    """A pickle that runs code when loaded: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, int]]:
        return (os.makedirs, (str(self.marker), 0o755))


def bundle(directory: Path) -> Path:
    directory.mkdir()
    joblib.dump({"weights": [1.0, 2.0]}, directory / "model.joblib")
    write_manifest(directory, Manifest(name="t", version="v1"))
    return directory


def test_a_pickle_whose_sha256_differs_is_refused_before_it_is_unpickled(tmp_path: Path) -> None:
    directory = bundle(tmp_path / "b")
    assert load_joblib(directory, "model.joblib") == {"weights": [1.0, 2.0]}
    marker = tmp_path / "pwned"
    (directory / "model.joblib").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ArtifactError, match="model.joblib does not match its manifest sha256"):
        load_joblib(directory, "model.joblib")
    assert not marker.exists()  # refused before unpickling: the planted code never ran
    with pytest.raises(ArtifactError, match=r"model.joblib has sha256 \w+…, manifest says"):
        read_manifest(directory)
    joblib.load(directory / "model.joblib")  # what an unchecked load would have done
    assert marker.exists()


def test_a_file_missing_from_the_bundle_or_from_the_manifest_is_refused(tmp_path: Path) -> None:
    directory = bundle(tmp_path / "b")
    (directory / "extra.joblib").write_bytes(b"not listed")
    with pytest.raises(ArtifactError, match="extra.joblib is not in the manifest"):
        load_joblib(directory, "extra.joblib")
    (directory / "model.joblib").unlink()
    with pytest.raises(ArtifactError, match="model.joblib is listed in the manifest but missing"):
        read_manifest(directory)
