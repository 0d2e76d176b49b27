"""A calibration-only bundle: the champion's voters frozen; the stacker (the ensemble's probability
calibrator), the conformal sets and the answer/escalation thresholds refit (`flockwatch.arbiter.fit`) on
texts the voters never trained on. What drift calls for before a full retrain: cheap (no voter is fitted)
and aimed at what drift breaks first, the calibration that the conformal guarantees rest on.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from flockwatch.arbiter.config import ConformalConfig
from flockwatch.arbiter.conformal import CALIBRATORS, save_sets
from flockwatch.arbiter.fit import fit_policy
from flockwatch.arbiter.model import harm_weights
from flockwatch.common.artifacts import (
    MANIFEST,
    new_version,
    pickle_of,
    publish_dir,
    read_manifest,
    verified_file,
    write_manifest,
)
from flockwatch.common.datasets import Dataset
from flockwatch.common.labels import LabelConfig
from flockwatch.common.slices import SliceConfig
from flockwatch.common.voting import opinions_matrix
from flockwatch.trainer.evaluate import decide_all, evaluate
from flockwatch.trainer.pipeline import Progress, model_card

REFIT = ("arbiter.json", CALIBRATORS, pickle_of(CALIBRATORS), "metrics.json", "model_card.md", "gate.json", MANIFEST)


def _outputs(champion: Path, texts: list[str], classes: list[str]) -> dict[str, np.ndarray]:
    """Every frozen voter's opinions ((n, k), NaN rows: abstained), the cascade voters asked on every text."""
    run = decide_all(champion, texts, mode="always")
    return {voter: opinions_matrix(column, classes) for voter, column in run.opinions.items()}


def recalibrate(
    champion: Path, fit_rows: Dataset, cal_rows: Dataset, held_out: Dataset, out: Path, progress: Progress
) -> Path:
    """Build the recalibrated bundle under `out/<version>` (not published); returns its directory."""
    parent = read_manifest(champion, verify=True)
    labels = LabelConfig.load(verified_file(champion, "labels.yaml"))
    classes = labels.names
    conformal = ConformalConfig.load(verified_file(champion, "conformal.yaml"))
    slices = SliceConfig.load(verified_file(champion, "slices.yaml")) if "slices.yaml" in parent.files else None
    progress(f"frozen voters on {len(fit_rows)} stacker and {len(cal_rows)} calibration texts")
    fit_out, cal_out = _outputs(champion, fit_rows.texts, classes), _outputs(champion, cal_rows.texts, classes)
    data = Dataset(fit_rows.texts + cal_rows.texts, fit_rows.labels + cal_rows.labels)
    version = new_version(data.sha256())
    progress("arbiter: stacker, conformal sets and thresholds refit (voters frozen)")
    policy = fit_policy(
        fit_out,
        np.array([classes.index(y) for y in fit_rows.labels]),
        cal_out,
        np.array([classes.index(y) for y in cal_rows.labels]),
        classes,
        harm_weights(labels),
        conformal,
        cal_texts=cal_rows.texts,
        slices=slices,
        version=f"arbiter-{version}",
    )
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    shutil.copytree(champion, staging, dirs_exist_ok=True, ignore=lambda _d, names: [n for n in names if n in REFIT])
    (staging / "arbiter.json").write_text(json.dumps(policy.to_dict(), indent=1), encoding="utf-8")
    save_sets(policy.sets, staging)
    manifest = parent.model_copy(
        update={
            "version": version,
            "parent": parent.version,
            "data_sha256": data.sha256(),
            "components": {**parent.components, "arbiter": policy.version},
            "config": {**parent.config, "recalibration": {"stacker_rows": len(fit_rows), "cal_rows": len(cal_rows)}},
            "metrics": {},
        }
    )
    write_manifest(staging, manifest)
    progress("evaluate on the held-out texts")
    metrics = evaluate(staging, held_out)
    metrics["calibration"] = policy.calibration_report
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    (staging / "model_card.md").write_text(model_card(manifest, metrics), encoding="utf-8")
    ens = metrics["ensemble"]
    headline = {k: ens.get(k) for k in ("macro_f1", "ece", "coverage", "selective_error")}
    write_manifest(staging, manifest.model_copy(update={"metrics": headline}))
    return publish_dir(staging, out, version)
