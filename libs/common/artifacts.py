"""Model artifacts: versioned directories with a manifest (version, parent, sha256s, data hash, metrics)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

MANIFEST = "manifest.json"
# Bundles hold no pickles (they run code when loaded): fitted objects are skops files, loaded with an allow-list of
# the types they may contain (`load_skops`); weights are safetensors; the rest is JSON or YAML.


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete, or does not match its manifest; it must not be loaded."""


class Manifest(BaseModel):
    """What an artifact directory holds and how it was made."""

    name: str
    version: str
    parent: str | None = None
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    data_sha256: str | None = None
    files: dict[str, str] = Field(default_factory=dict, description="relative path → sha256")
    metrics: dict[str, Any] = Field(default_factory=dict)
    components: dict[str, str] = Field(default_factory=dict, description="component → its version")
    config: dict[str, Any] = Field(default_factory=dict)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> Manifest:
    """Hash every file under `directory` into the manifest and write it; returns the completed manifest."""
    files = {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = manifest.model_copy(update={"files": files})
    (directory / MANIFEST).write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
    return manifest


def manifest_sha256(directory: Path) -> str:
    """The sha256 of a bundle's manifest file: one hash that pins every file of the bundle."""
    return sha256_file(directory / MANIFEST)


def check_announced(directory: Path, announced_sha256: str) -> None:
    """Refuse an announced bundle (`ModelPublished`) unless its manifest is the one announced and every file of
    it matches: a bundle is taken whole or not at all, so that no service moves to a version another refuses."""
    if not (Path(directory) / MANIFEST).exists():
        raise ArtifactError(f"{directory}: no {MANIFEST} (not an artifact directory)")
    actual = manifest_sha256(Path(directory))
    if actual != announced_sha256:
        raise ArtifactError(
            f"{directory}: {MANIFEST} has sha256 {actual[:12]}…, the announcement says {announced_sha256[:12]}…"
        )
    read_manifest(directory, verify=True)


def read_manifest(directory: Path, verify: bool = True) -> Manifest:
    """Read a manifest; with `verify`, check every file's sha256 and refuse extra or missing files."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise ArtifactError(f"{directory}: no {MANIFEST} (not an artifact directory; run `flockwatch train`)")
    manifest = Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    if verify:
        for rel, digest in manifest.files.items():
            file = Path(directory) / rel
            if not file.exists():
                raise ArtifactError(f"{directory}: {rel} is listed in the manifest but missing")
            actual = sha256_file(file)
            if actual != digest:
                raise ArtifactError(f"{directory}: {rel} has sha256 {actual[:12]}…, manifest says {digest[:12]}…")
    return manifest


def verified_file(directory: Path, rel: str) -> Path:
    """A file of a verified artifact (its hash checked now, right before use)."""
    manifest = read_manifest(directory, verify=False)
    file = Path(directory) / rel
    if rel not in manifest.files:
        raise ArtifactError(f"{directory}: {rel} is not in the manifest")
    if not file.exists() or sha256_file(file) != manifest.files[rel]:
        raise ArtifactError(f"{directory}: {rel} does not match its manifest sha256")
    return file


def type_name(kind: type) -> str:
    """A type's name as skops lists it (module.qualname)."""
    return f"{kind.__module__}.{kind.__qualname__}"


# The scikit-learn modules whose estimators bundles hold; skops trusts their public estimators by default.
SKLEARN_MODULES = (
    "sklearn.calibration",
    "sklearn.feature_extraction.text",
    "sklearn.isotonic",
    "sklearn.linear_model",
    "sklearn.pipeline",
    "sklearn.preprocessing",
    "sklearn.svm",
)


def _bundle_estimators() -> list[tuple[str, type]]:
    """The public estimators of `SKLEARN_MODULES`, as `sklearn.utils.all_estimators` lists every module's."""
    import importlib

    from sklearn.base import BaseEstimator

    found = {
        (name, obj)
        for module in SKLEARN_MODULES
        for name, obj in vars(importlib.import_module(module)).items()
        if isinstance(obj, type) and issubclass(obj, BaseEstimator) and not name.startswith("_")
    }
    return sorted(found, key=lambda pair: (pair[0], pair[1].__module__))


def _skops_io() -> Any:
    """`skops.io`, its default allow-list the estimators of `SKLEARN_MODULES` instead of all of scikit-learn's.
    skops builds that list when imported, from `sklearn.utils.all_estimators`, which imports every scikit-learn
    module (their tests too): 1.6 s, +200 MiB and torch and pytest imported where installed, in a TF-IDF voter or
    the arbiter. For that one import `all_estimators` lists only the modules bundles use: narrower trust, 0.4 s."""
    if "skops.io" not in sys.modules:
        import sklearn.utils

        real = sklearn.utils.all_estimators
        sklearn.utils.all_estimators = _bundle_estimators
        try:
            import skops.io
        finally:
            sklearn.utils.all_estimators = real
    import skops.io

    return skops.io


def dump_skops(obj: Any, path: Path) -> None:
    """Write a fitted object in the skops format: a zip of JSON and arrays, rebuilt on load without pickle
    (deflated: the TF-IDF vocabularies, fixed-width unicode arrays, shrink about 4x)."""
    import zipfile

    _skops_io().dump(obj, path, compression=zipfile.ZIP_DEFLATED, compresslevel=6)


def load_skops(directory: Path, rel: str, trusted: Iterable[type | str]) -> Any:
    """A skops file of a verified artifact, rebuilt only if every type it names is one skops trusts by default
    (numpy, scipy, scikit-learn, builtins) or one of `trusted`: a file naming any other type is refused before
    anything in it is constructed, whatever its sha256 (hashes prove integrity, not origin)."""
    skops_io = _skops_io()
    from skops.io.exceptions import UntrustedTypesFoundException

    _refuse_pickle(directory, read_manifest(directory, verify=False), rel)
    file = verified_file(directory, rel)
    allowed = sorted({t if isinstance(t, str) else type_name(t) for t in trusted})
    try:
        # skops audits the whole tree against the allow-list before it constructs anything
        return skops_io.load(file, trusted=allowed)
    except UntrustedTypesFoundException:
        refused = sorted(set(skops_io.get_untrusted_types(file=file)) - set(allowed))
        raise ArtifactError(
            f"{directory}/{rel} names types outside its allow-list, refused unloaded: {refused}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - not a skops file, or a damaged one: whatever the reader raised
        raise ArtifactError(f"{directory}/{rel}: not a readable skops file ({type(exc).__name__}: {exc})") from exc


def pickle_of(name: str) -> str:
    """The pickle an earlier version wrote where the skops file `name` is now: the same stem, `.joblib`."""
    return str(Path(name).with_suffix(".joblib"))


def has_skops(directory: Path, manifest: Manifest, name: str) -> bool:
    """Whether the bundle holds the skops file `name`; one that holds its pickle instead (an earlier version's
    bundle) is refused, rather than taken for a bundle without that part."""
    _refuse_pickle(directory, manifest, name)
    return name in manifest.files


def _refuse_pickle(directory: Path, manifest: Manifest, name: str) -> None:
    legacy = pickle_of(name)
    if legacy in manifest.files:
        raise ArtifactError(
            f"{directory}: {legacy} is a pickle (bundles of earlier versions); pickles are not loaded because they "
            "run code. Retrain the bundle (`flockwatch train`) to write it in the skops format"
        )


def load_json(directory: Path, rel: str) -> Any:
    """Read a JSON file of a verified artifact."""
    return json.loads(verified_file(directory, rel).read_text(encoding="utf-8"))


def new_version(data_sha256: str) -> str:
    """A sortable version string: UTC time plus a short data hash."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{data_sha256[:8]}"


def publish_dir(staging: Path, root: Path, version: str) -> Path:
    """Move a finished staging directory to `root/version` and point `root/current` at it."""
    target = root / version
    if target.exists():
        shutil.rmtree(target)
    root.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), target)
    point_current(root, version)
    return target


def point_current(root: Path, version: str) -> None:
    """Atomically point `root/current` at `root/version` (a relative symlink, replaced in one rename)."""
    tmp = root / ".current.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(version)
    tmp.replace(root / "current")
