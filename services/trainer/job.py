"""One training run in a process of its own: `python -m flockwatch.trainer.job SPEC.json`.

The trainer service starts it and terminates it to cancel (a thread cannot be stopped; a process can). It
prints progress as JSON lines on stdout and writes `result.json` next to the spec. The candidate bundle
it builds stays in the run's work directory, with the gate decision, parent and lineage in its manifest,
metrics and model card; only the service publishes it (and only when the gate passed).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from flockwatch.common.artifacts import read_manifest, verified_file
from flockwatch.common.datasets import Dataset, read_table
from flockwatch.trainer import data as rundata
from flockwatch.trainer.evaluate import collect
from flockwatch.trainer.gate import Check, GateConfig, GateResult, HeldOut, Outputs, decide, summary_line
from flockwatch.trainer.pipeline import Progress, TrainConfig, train
from flockwatch.trainer.registry import finalize
from flockwatch.trainer.safety import MUST_CATCH, bundle_cases, check_must_catch, read_classes
from pydantic import BaseModel, Field

RESULT = "result.json"
# the task's configuration a retrain takes from the champion unless told otherwise: key → file in the bundle
CONFIG_FILES = {
    "labels": "labels.yaml",
    "rules": "rules.yaml",
    "slices": "slices.yaml",
    "conformal": "conformal.yaml",
    "must_catch": MUST_CATCH,
}


class JobSpec(BaseModel):
    """Everything a run needs; written by the service as `spec.json` in the run's work directory."""

    run_id: str
    kind: Literal["full", "recalibrate"] = "full"
    work_dir: Path
    name: str
    champion: Path | None = None
    base_data: Path
    text_col: str = "text"
    label_col: str = "label"
    base_limit: int | None = None
    corrections: list[tuple[str, str]] = Field(default_factory=list, description="every clean (text, label)")
    recent: list[tuple[str, str]] = Field(default_factory=list, description="those newer than the champion")
    configs: dict[str, Path | None] = Field(default_factory=dict, description="labels, rules, slices, conformal, …")
    folds: int = 5
    llm_min_corrections: int = 200
    gate: dict[str, Any] = Field(default_factory=dict)
    feedback_watermark: int = 0


def _config(spec: JobSpec, key: str) -> Path | None:
    """An explicitly configured file, else the champion's copy (a retrain keeps the task's configuration)."""
    if spec.configs.get(key) is not None:
        return spec.configs[key]
    rel = CONFIG_FILES.get(key, f"{key}.yaml")
    if key in CONFIG_FILES and spec.champion and rel in read_manifest(spec.champion, verify=False).files:
        return verified_file(spec.champion, rel)
    return None


def _champion_lfs(spec: JobSpec) -> Path | None:
    """The configured lfs.yaml, else the champion's keyword and voter LFs (from its ws_lfs.yaml) as one."""
    if spec.configs.get("lfs") is not None or spec.champion is None:
        return spec.configs.get("lfs")
    from flockwatch.ws_voter.app import DEFINITION

    if DEFINITION not in read_manifest(spec.champion, verify=False).files:
        return None
    record = yaml.safe_load(verified_file(spec.champion, DEFINITION).read_text(encoding="utf-8")) or {}
    lfs = (record.get("definition") or {}).get("lfs") or {}
    if not (lfs.get("lfs") or lfs.get("voters")):
        return None  # the champion's LFs were its rules only: rules.yaml carries them
    path = spec.work_dir / "champion_lfs.yaml"
    path.write_text(yaml.safe_dump(lfs, sort_keys=False), encoding="utf-8")
    return path


def _champion_embedding(spec: JobSpec) -> tuple[Path | None, Any]:
    """The configured encoder folder, else the champion's embedding voter as it was trained: its encoder
    (found again and checked by sha256) and, for a fine-tuned one, its fine-tuning configuration."""
    if spec.configs.get("embedding") is not None or spec.champion is None:
        return spec.configs.get("embedding"), None
    from flockwatch.classical_voter.embedding_app import INFO
    from flockwatch.classical_voter.encoder import locate

    if INFO not in read_manifest(spec.champion, verify=False).files:
        return None, None
    info = json.loads(verified_file(spec.champion, INFO).read_text(encoding="utf-8"))
    folder = locate(info["encoder"])
    if info.get("kind") != "finetuned":
        return folder, None
    from flockwatch.classical_voter.finetune import FinetuneConfig

    return folder, FinetuneConfig(**info.get("config", {}))


def _train_full(spec: JobSpec, run: rundata.RunData, held: Dataset, progress: Progress) -> Path:
    return train(full_config(spec, rundata.training_rows(run), held), progress)


def full_config(spec: JobSpec, data: Dataset, held: Dataset) -> TrainConfig:
    """A full run's configuration: what the trainer is told, else the champion's whole configuration (labels,
    rules, keyword and voter LFs, slices, conformal.yaml, must-catch cases, the embedding voter)."""
    llm = spec.configs.get("llm") if len(spec.corrections) >= spec.llm_min_corrections else None
    encoder, finetune = _champion_embedding(spec)
    config = TrainConfig(
        data=data,
        test=held,
        out=spec.work_dir / "candidates",
        name=spec.name,
        labels=_config(spec, "labels"),
        rules=_config(spec, "rules"),
        slices=_config(spec, "slices"),
        conformal=_config(spec, "conformal"),
        lfs=_champion_lfs(spec),
        llm=llm,
        folds=spec.folds,
        embedding=encoder,
        finetune=finetune,
        must_catch=_config(spec, "must_catch"),
    )
    if spec.configs.get("llm_base") is not None:
        config.llm_base = Path(str(spec.configs["llm_base"]))
    return config


def _outputs(model_dir: Path, held: Dataset, classes: list[str]) -> tuple[Outputs, dict[str, np.ndarray]]:
    """A bundle's combined probabilities (columns in `classes` order) and answers on the held-out texts; slices."""
    inputs = collect(model_dir, held)
    cols = [inputs.classes.index(c) if c in inputs.classes else -1 for c in classes]
    probs = np.stack([inputs.ensemble[:, j] if j >= 0 else np.zeros(len(held)) for j in cols], axis=1)
    masks = {}
    for name, members in inputs.slices.items():
        mask = np.zeros(len(held), dtype=bool)
        mask[np.asarray(members, dtype=np.int64)] = True
        masks[name] = mask
    return Outputs(probs, np.asarray(inputs.answered, dtype=bool)), masks


def gate_candidate(
    candidate: Path,
    champion: Path | None,
    held: rundata.HeldOutSet,
    kind: Literal["full", "recalibrate"],
    cfg: GateConfig,
) -> GateResult:
    """Champion and challenger on the same held-out texts, through the services' own decision code."""
    challenger, slices = _outputs(candidate, held.data, classes := read_classes(candidate))
    y = np.array([classes.index(label) for label in held.data.labels], dtype=np.int64)
    champ = _outputs(champion, held.data, classes)[0] if champion is not None else None
    result = decide(HeldOut(y, classes, slices, held.reference), challenger, champ, kind, cfg)
    cases = bundle_cases(candidate)
    if cases is None:
        return result
    safety = check_must_catch(candidate, cases)  # a challenger that answers one case wrongly is rejected
    check = Check("must_catch", safety.passed, safety.to_dict())
    return replace(result, checks=[*result.checks, check], passed=result.passed and safety.passed)


def run(spec: JobSpec, progress: Progress) -> dict[str, Any]:
    """Data, candidate, gate; returns the result record (also written to result.json)."""
    started = time.perf_counter()
    progress("data: base set with the clean corrections applied")
    base = read_table(spec.base_data, spec.text_col, spec.label_col)
    if spec.base_limit:
        base = Dataset(base.texts[: spec.base_limit], base.labels[: spec.base_limit])
    merged = rundata.merge(base, spec.corrections)
    held = rundata.held_out(merged)
    # how the champion was trained (its manifest's config: calibration scheme, held-out shares)
    champion = read_manifest(spec.champion, verify=False) if spec.champion else None
    trained_as = champion.config if champion else {}
    if spec.kind == "recalibrate":
        if spec.champion is None:
            raise ValueError("a calibration-only run needs a published champion")
        from flockwatch.trainer.recalibrate import recalibrate

        held_cal = trained_as.get("calibration") == "holdout"
        fit_rows, cal_rows = rundata.recalibration_pool(merged, spec.recent, calibration_held_out=held_cal)
        candidate = recalibrate(spec.champion, fit_rows, cal_rows, held.data, spec.work_dir / "candidates", progress)
    else:
        candidate = _train_full(spec, merged, held.data, progress)
    trained = time.perf_counter()
    progress(f"gate: champion vs challenger on {len(held.data)} held-out texts")
    if champion is not None and trained_as.get("test_frac") == 0:  # (None: a test file)
        progress(
            "warning: the champion held no test share out (train it with --test-frac 0.25): it trained on "
            "the gate's held-out texts, so its scores there are optimistic and challengers lose more often"
        )
    gate = gate_candidate(candidate, spec.champion, held, spec.kind, GateConfig(**spec.gate)).to_dict()
    parent = champion.version if champion else None
    data_report = {**merged.report, "held_out": len(held.data), "held_out_reference": int(held.reference.sum())}
    data_report["held_out_dropped_leaks"] = held.dropped_leaks
    lineage = {
        "run_id": spec.run_id,
        "kind": spec.kind,
        "data": data_report,
        "feedback_watermark": spec.feedback_watermark,
    }
    manifest = finalize(candidate, parent=parent, gate=gate, lineage=lineage)
    progress(summary_line(gate))
    return {
        "candidate": str(candidate),
        "version": manifest.version,
        "parent": parent,
        "gate": gate,
        "data": data_report,
        "metrics": manifest.metrics,
        "durations": {"train_s": trained - started, "gate_s": time.perf_counter() - trained},
    }


def _emit(message: str) -> None:
    print(json.dumps({"progress": message}), flush=True)  # noqa: T201 - the service reads these lines


def main(argv: list[str]) -> int:
    """Run the spec at argv[0]; the result (or the error) goes to result.json beside it."""
    spec_path = Path(argv[0])
    spec = JobSpec.model_validate_json(spec_path.read_text(encoding="utf-8"))
    out = spec_path.parent / RESULT
    try:
        result = run(spec, _emit)
    except Exception as exc:  # noqa: BLE001 - the process boundary: report any failure to the service
        out.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), encoding="utf-8")
        return 1
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
