"""Weak-supervision voter service: loads the bundle's label model (and the voters its LFs read) and votes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml
from flockwatch.classical_voter.app import load_core as load_classical
from flockwatch.common.artifacts import ArtifactError, dump_skops, has_skops, load_skops, read_manifest
from flockwatch.common.service import VoterCore, VoterService
from flockwatch.regex_voter.app import load_core as load_regex
from flockwatch.ws_voter.lfs import LabelModelSpec, LFSet, PatternLF, VoterLF
from flockwatch.ws_voter.model import WSModel

ARTIFACT = "ws.skops"
# what ws.skops may hold beyond what skops trusts by default: the model, its LFs and the label model's spec
TRUSTED: tuple[type, ...] = (WSModel, LFSet, PatternLF, VoterLF, LabelModelSpec)
DEFINITION = "ws_lfs.yaml"
# The voters a voter LF may read, each loaded from the same bundle by its own service's loader.
VOTER_LOADERS: tuple[Callable[[Path], VoterCore | None], ...] = (load_regex, load_classical)


def save(model: WSModel, directory: Path) -> list[str]:
    """Write the fitted model and a readable copy of its LF definitions; returns the file names written."""
    directory.mkdir(parents=True, exist_ok=True)
    dump_skops(model, directory / ARTIFACT)
    record = {
        "version": model.version,
        "method": model.method_,
        "classes": model.classes,
        "lfs": [
            {"id": i, "source": s, "label": lab}
            for i, s, lab in zip(model.lfs.ids, model.lfs.sources, model.lfs.lf_labels, strict=True)
        ],
        "report": model.report_,
        "definition": model.lfs.definition,
    }
    (directory / DEFINITION).write_text(yaml.safe_dump(record, sort_keys=False), encoding="utf-8")
    return [ARTIFACT, DEFINITION]


def load_core(model_dir: Path) -> VoterCore | None:
    """The bundle's WS model (sha256-verified, rebuilt from skops with an allow-list of types) with the voter cores
    it reads, or None."""
    manifest = read_manifest(model_dir, verify=False)
    if not has_skops(model_dir, manifest, ARTIFACT):
        return None
    model = load_skops(model_dir, ARTIFACT, TRUSTED)
    if not isinstance(model, WSModel):
        raise TypeError(f"{model_dir}/{ARTIFACT} does not hold a WSModel")
    model.version = manifest.components.get("ws", model.version)
    needed = set(model.lfs.needed_voters)
    if needed:
        cores = [core for load in VOTER_LOADERS if (core := load(model_dir)) is not None]
        sources = [core for core in cores if needed & set(core.voters)]
        missing = sorted(needed - {v for core in sources for v in core.voters})
        if missing:
            raise ArtifactError(f"{model_dir}: the WS model's voter LFs read {missing}, which the bundle lacks")
        model.attach(sources)
    return model


class WSVoterService(VoterService):
    """Votes with a Snorkel label model (or majority vote) over labeling functions."""

    name = "ws_voter"

    def load(self, model_dir: Path) -> VoterCore | None:
        return load_core(model_dir)
