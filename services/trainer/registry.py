"""The model registry: the versions under a model root, `current`, lineage and gate in each bundle, history.

A model root (e.g. `models/sms`) holds one directory per version (files + manifest + model card), the
`current` symlink the services load, and `history.jsonl`: an append-only record of which version was
pointed at when, by what (publish or rollback), for audit and rollback.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flockwatch.common.announcements import signed
from flockwatch.common.artifacts import (
    MANIFEST,
    ArtifactError,
    Manifest,
    manifest_sha256,
    point_current,
    publish_dir,
    read_manifest,
    write_manifest,
)
from flockwatch.common.events import ModelPublished
from flockwatch.trainer.gate import summary_line
from pydantic import SecretStr

HISTORY = "history.jsonl"
GATE_FILE = "gate.json"


def versions(root: Path) -> list[Manifest]:
    """Every version under `root` (unverified manifests), oldest first."""
    if not root.is_dir():
        return []
    found = [
        read_manifest(d, verify=False)
        for d in root.iterdir()
        if d.is_dir() and not d.is_symlink() and not d.name.startswith(".") and (d / MANIFEST).exists()
    ]
    return sorted(found, key=lambda m: (m.created, m.version))


def current_version(root: Path) -> str | None:
    """The version `root/current` points at."""
    link = root / "current"
    return os.readlink(link).rstrip("/").rsplit("/", 1)[-1] if link.is_symlink() else None


def version_dir(root: Path, version: str) -> Path:
    """The directory of a version (refuses anything but a plain version name)."""
    if not version or "/" in version or version.startswith(".") or version == "current":
        raise ArtifactError(f"not a version name: {version!r}")
    path = root / version
    if not (path / MANIFEST).exists():
        raise ArtifactError(f"{root}: no version {version}")
    return path


def finalize(candidate: Path, *, parent: str | None, gate: dict[str, Any], lineage: dict[str, Any]) -> Manifest:
    """Write the gate decision and lineage into a candidate bundle: gate.json, metrics.json, card, manifest."""
    manifest = read_manifest(candidate, verify=True)
    (candidate / GATE_FILE).write_text(json.dumps(gate, indent=1), encoding="utf-8")
    metrics_path = candidate / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else {}
    metrics["gate"] = gate
    metrics_path.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    card = candidate / "model_card.md"
    lines = [
        "",
        "## Lineage and gate",
        "",
        f"Parent: {parent or '(none: the first version)'}. Run {lineage.get('run_id')} ({lineage.get('kind')}); "
        f"data {lineage.get('data')}; feedback watermark {lineage.get('feedback_watermark')}.",
        "",
        summary_line(gate) + ".",
        "",
    ]
    card.write_text((card.read_text(encoding="utf-8") if card.exists() else "") + "\n".join(lines), encoding="utf-8")
    summary = {"passed": gate["passed"], "reasons": gate["reasons"], "kind": gate["kind"], "n": gate["n"]}
    update = {
        "parent": parent,
        "metrics": {**manifest.metrics, "gate": summary},
        "config": {**manifest.config, "lineage": lineage},
    }
    return write_manifest(candidate, manifest.model_copy(update=update))


def record(root: Path, action: str, version: str, **extra: Any) -> dict[str, Any]:
    """Append one line to the history (locked and fsynced: concurrent writers never interleave)."""
    entry = {"at": datetime.now(UTC).isoformat(), "action": action, "version": version, **extra}
    root.mkdir(parents=True, exist_ok=True)
    with (root / HISTORY).open("a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
        fcntl.flock(fh, fcntl.LOCK_UN)
    return entry


def history(root: Path) -> list[dict[str, Any]]:
    """Every history entry, oldest first."""
    path = root / HISTORY
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def promote(root: Path, candidate: Path, **extra: Any) -> Path:
    """Move a gated candidate under `root`, point `current` at it, record it; returns its directory."""
    manifest = read_manifest(candidate, verify=True)
    previous = current_version(root)
    target = publish_dir(candidate, root, manifest.version)
    record(root, "publish", manifest.version, previous=previous, parent=manifest.parent, **extra)
    return target


def rollback(root: Path, version: str, **extra: Any) -> Path:
    """Point `current` back at an earlier version (verified first) and record it; returns its directory."""
    target = version_dir(root, version)
    read_manifest(target, verify=True)
    previous = current_version(root)
    point_current(root, version)
    record(root, "rollback", version, previous=previous, **extra)
    return target


def announcement(directory: Path, key: SecretStr | None = None) -> ModelPublished:
    """The `ModelPublished` for a bundle (a fresh message id: re-announcing an old version is a new event),
    signed with `key` (FLOCKWATCH_BUNDLE_KEY) when there is one."""
    directory = directory.resolve()
    manifest = read_manifest(directory, verify=False)
    floats = {
        k: float(v) for k, v in manifest.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    event = ModelPublished(
        message_id=f"model:{manifest.name}:{manifest.version}:{uuid.uuid4().hex[:12]}",
        component="bundle",
        version=manifest.version,
        path=str(directory),
        manifest_sha256=manifest_sha256(directory),
        metrics=floats,
    )
    return signed(event, key)


def describe(root: Path, manifest: Manifest) -> dict[str, Any]:
    """A version's row for `models list`: lineage, headline metrics, gate, whether it is current."""
    gate = manifest.metrics.get("gate") or {}
    return {
        "version": manifest.version,
        "current": manifest.version == current_version(root),
        "created": manifest.created.isoformat(timespec="seconds"),
        "parent": manifest.parent,
        "macro_f1": manifest.metrics.get("macro_f1"),
        "ece": manifest.metrics.get("ece"),
        "coverage": manifest.metrics.get("coverage"),
        "gate": "–" if not gate else "passed" if gate.get("passed") else "rejected: " + ", ".join(gate["reasons"]),
    }
