"""`flockwatch train`: fit every configured voter and the arbiter, evaluate, and write a model bundle.

Every labeled text is used. The voters are cross-fitted: K folds (one assignment shared by all voters
and the combiner) give each text an out-of-fold output, and the final voters are refitted on all texts.
The combiner is chosen and fitted on the out-of-fold outputs. Calibration of the sets and of the answer
threshold is either cross-fitted (default: on the same out-of-fold scores, every text counts) or held out
(`calibration="holdout"`: a hash-chosen share no voter trains on; exact split-conformal validity). A test
set is kept apart only when asked (`test` data or `test_frac`); without one, the metrics are the
out-of-fold ones.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from flockwatch.arbiter.config import ConformalConfig
from flockwatch.arbiter.conformal import save_sets
from flockwatch.arbiter.fit import fit_policy
from flockwatch.arbiter.model import ArbiterPolicy, harm_weights
from flockwatch.arbiter.select import fold_ids
from flockwatch.classical_voter.app import save as save_classical
from flockwatch.classical_voter.model import ClassicalModel
from flockwatch.common.artifacts import Manifest, new_version, publish_dir, write_manifest
from flockwatch.common.datasets import CALIBRATION_FRACTION, Dataset, hold_out
from flockwatch.common.labels import LabelConfig
from flockwatch.common.slices import SliceConfig
from flockwatch.common.voting import opinions_matrix
from flockwatch.regex_voter.model import RuleEngine
from flockwatch.regex_voter.rules import load_rules
from flockwatch.trainer.crossfit import out_of_fold_metrics
from flockwatch.trainer.evaluate import evaluate
from flockwatch.trainer.plan import Costs, choose_plan, measure_costs
from flockwatch.trainer.safety import MUST_CATCH, check_must_catch, load_cases
from flockwatch.ws_voter.app import save as save_ws
from flockwatch.ws_voter.lfs import load_lfs
from flockwatch.ws_voter.model import WSModel

Progress = Callable[[str], None]


@dataclass
class TrainConfig:
    """What to train on and with which optional configuration files."""

    data: Dataset
    out: Path
    name: str
    labels: Path | None = None
    rules: Path | None = None
    slices: Path | None = None
    conformal: Path | None = None
    lfs: Path | None = None
    llm: Path | None = None
    llm_base: Path = Path("models/base/smollm2-135m-instruct")
    folds: int = 5
    # a local sentence-transformers folder: adds the `minilm` embedding voter (None: no embedding voter)
    embedding: Path | None = None
    # fine-tune that encoder end to end (a FinetuneConfig) instead of fitting a head on frozen embeddings
    finetune: Any = None
    test: Dataset | None = None  # evaluate on these texts (never trained on)
    test_frac: float = 0.0  # without `test`: hold out this share of `data` (by text hash) for the test report
    calibration: Literal["crossfit", "holdout"] = "crossfit"
    cal_frac: float = CALIBRATION_FRACTION  # holdout: the share of the training texts kept for calibration
    must_catch: Path | None = None  # curated cases the bundle must never answer wrongly (checked by the gate)


def _labels(config: TrainConfig) -> LabelConfig:
    labels = (
        LabelConfig.load(config.labels) if config.labels else LabelConfig.from_names(config.name, config.data.classes)
    )
    unknown = sorted(set(config.data.labels) - set(labels.names))
    if unknown:
        raise ValueError(f"the data has labels missing from {config.labels}: {unknown}")
    return labels


def train(config: TrainConfig, progress: Progress = lambda _: None) -> Path:
    """Train, evaluate and publish a bundle under `config.out/<version>`; returns its directory."""
    labels = _labels(config)
    classes = labels.names
    train_set, cal_set, test_set = parts(config)
    y_train = np.array([classes.index(y) for y in train_set.labels])
    y_cal = np.array([classes.index(y) for y in cal_set.labels])
    folds = fold_ids(train_set.labels, config.folds)

    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_ensure(config.out)))
    fitted = _Fitted(train_set, cal_set, staging, folds=folds)
    oof, cal, components = fitted.oof, fitted.cal, fitted.components
    shutil.copyfile(config.labels, staging / "labels.yaml") if config.labels else _dump_labels(labels, staging)
    slices = SliceConfig.load(config.slices) if config.slices else None
    if config.slices:
        shutil.copyfile(config.slices, staging / "slices.yaml")
    conformal = ConformalConfig.load(config.conformal)
    _dump_yaml(conformal.model_dump(), staging / "conformal.yaml")
    if config.must_catch:
        load_cases(config.must_catch)  # readable before hours of training, not after
        shutil.copyfile(config.must_catch, staging / MUST_CATCH)
    if config.rules:
        progress("regex rules")
        engine = RuleEngine(load_rules(config.rules, labels), labels)
        shutil.copyfile(config.rules, staging / "rules.yaml")
        components["regex"] = f"rules-{engine.version}"
        # rules are not fitted, so their train outputs are already out-of-fold
        oof["regex"] = opinions_matrix(engine.predict(train_set.texts), classes)
        cal["regex"] = opinions_matrix(engine.predict(cal_set.texts), classes)

    progress("classical voters: fit on every training text (calibration method chosen on held-out ECE)")
    model = ClassicalModel().fit(train_set.texts, train_set.labels)
    n_folds = len(np.unique(folds))
    progress(f"classical voters: {n_folds}-fold out-of-fold outputs")
    oof.update(
        _reorder(
            model.oof_proba(train_set.texts, train_set.labels, n_splits=n_folds, folds=folds), model.classes_, classes
        )
    )
    cal.update(_reorder(model.predict_proba_all(cal_set.texts), model.classes_, classes))
    save_classical(model, staging)
    embedding_report = _embedding(config, fitted, classes, progress)
    ws_report = _weak_supervision(config, labels, fitted, progress)
    llm_report = _llm(config, labels, fitted, progress)

    crossfit = config.calibration == "crossfit"
    where = "cross-fitted on every text" if crossfit else f"on {len(cal_set)} held-out texts"
    progress(f"arbiter: combiner chosen on out-of-fold outputs; conformal sets and thresholds {where}")
    version = new_version(config.data.sha256())
    components["classical"] = f"classical-{version}"

    def fit(plan_config: ConformalConfig) -> ArbiterPolicy:
        return fit_policy(
            oof,
            y_train,
            None if crossfit else cal,
            None if crossfit else y_cal,
            classes,
            harm_weights(labels),
            plan_config,
            cal_texts=train_set.texts if crossfit else cal_set.texts,
            slices=slices,
            version=f"arbiter-{version}",
            folds=folds,
            # measured on the bundled and sentiment sets: the out-of-fold temperature lowers the served ECE when
            # the fine-tuned encoder votes, and raises it with TF-IDF voters alone (services/arbiter/config.py)
            serve_temperature=config.finetune is not None and config.embedding is not None,
        )

    costs: Costs = {}
    if conformal.budget is not None and conformal.cascade.tiers:
        progress("voters' CPU cost per text, for the plan within the budget")
        write_manifest(staging, Manifest(name=config.name, version="staging", components=components))
        costs = measure_costs(staging, train_set.texts)
    plan = choose_plan(fit, conformal, costs)
    policy = plan.policy
    _dump_yaml(plan.config.model_dump(exclude_none=True), staging / "conformal.yaml")  # as deployed
    components["arbiter"] = policy.version
    (staging / "arbiter.json").write_text(json.dumps(policy.to_dict(), indent=1), encoding="utf-8")
    save_sets(policy.sets, staging)

    manifest = Manifest(
        name=config.name,
        version=version,
        data_sha256=config.data.sha256(),
        components=components,
        config={
            "risk_target": conformal.risk.target,
            "alpha": conformal.alpha,
            "folds": n_folds,
            "calibration": config.calibration,
            # the hash shares held out ("test" and "calibration" salts): what these voters never trained on
            "test_frac": config.test_frac if config.test is None else None,
            "cal_frac": config.cal_frac if config.calibration == "holdout" else 0.0,
            "splits": {"train": len(train_set), "calibration": len(cal_set), "test": len(test_set)},
            "certified": bool(policy.calibration_report["risk"]["certified"]),
        },
    )
    write_manifest(staging, manifest)
    if len(test_set):
        progress(f"evaluate on the {len(test_set)} test texts")
        metrics = evaluate(staging, test_set)
    else:
        metrics = out_of_fold_metrics(oof, policy, y_train if crossfit else y_cal, classes)
    metrics["calibration"] = policy.calibration_report
    if config.must_catch:
        progress("must-catch cases")
        metrics["must_catch"] = check_must_catch(staging, load_cases(staging / MUST_CATCH)).to_dict()
    if ws_report:
        metrics["ws_choice"] = ws_report
    if llm_report:
        metrics["llm_training"] = llm_report
    if embedding_report:
        metrics["embedding_training"] = embedding_report
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    (staging / "model_card.md").write_text(model_card(manifest, metrics), encoding="utf-8")
    write_manifest(staging, manifest.model_copy(update={"metrics": _headline(metrics)}))
    return publish_dir(staging, config.out, version)


def parts(config: TrainConfig) -> tuple[Dataset, Dataset, Dataset]:
    """(train, calibration, test) texts: calibration is empty when cross-fitted, test unless one is asked for."""
    data, test = config.data, config.test
    if test is None:
        data, test = hold_out(data, config.test_frac, "test")
    if config.calibration == "holdout":
        train_set, cal_set = hold_out(data, config.cal_frac, "calibration")
    else:
        train_set, cal_set = data, Dataset([], [])
    return train_set, cal_set, test


@dataclass
class _Fitted:
    """What the voters fitted so far hand the arbiter: out-of-fold train and calibration outputs, versions."""

    train_set: Dataset
    cal_set: Dataset
    staging: Path
    folds: np.ndarray | None = None  # the shared fold number of each train text
    oof: dict[str, np.ndarray] = field(default_factory=dict)
    cal: dict[str, np.ndarray] = field(default_factory=dict)
    components: dict[str, str] = field(default_factory=dict)


def _embedding(config: TrainConfig, fitted: _Fitted, classes: list[str], progress: Progress) -> dict[str, Any]:
    """The sentence-embedding voter: each text embedded once; K-fold out-of-fold on train, outputs on calibration."""
    if config.embedding is None:
        return {}
    from flockwatch.classical_voter.embedding import VOTER
    from flockwatch.classical_voter.embedding_app import train_embedding

    train_set = fitted.train_set
    extra = {} if config.finetune is None else {"finetune": config.finetune}
    result = train_embedding(
        config.embedding,
        (train_set.texts, train_set.labels),
        fitted.cal_set.texts,
        fitted.staging,
        folds=config.folds,
        progress=progress,
        **extra,
    )
    fitted.oof.update(_reorder({VOTER: result.oof}, result.classes, classes))
    fitted.cal.update(_reorder({VOTER: result.cal}, result.classes, classes))
    fitted.components[VOTER] = f"{VOTER}-{new_version(config.data.sha256())}"
    return result.report


def _weak_supervision(config: TrainConfig, labels: LabelConfig, fitted: _Fitted, progress: Progress) -> dict[str, Any]:
    """The Snorkel voter over the rules and keyword LFs; its train outputs use no labels, so they are out-of-fold.

    Voter LFs read the other voters' out-of-fold train outputs here and their live outputs at run time.
    """
    if not (config.rules or config.lfs):
        return {}
    progress("weak supervision: label model over the labeling functions")
    train_set, oof, cal = fitted.train_set, fitted.oof, fitted.cal
    ws = WSModel.fit(
        train_set.texts, labels, load_lfs(labels, config.rules, config.lfs), voter_outputs=oof, y=train_set.labels
    )
    oof["ws"] = opinions_matrix(ws.predict_with(train_set.texts, oof)["ws"], labels.names)
    cal["ws"] = opinions_matrix(ws.predict_with(fitted.cal_set.texts, cal)["ws"], labels.names)
    save_ws(ws, fitted.staging)
    fitted.components["ws"] = ws.version
    return dict(ws.report_)


def _llm(config: TrainConfig, labels: LabelConfig, fitted: _Fitted, progress: Progress) -> dict[str, Any]:
    """The LoRA adapter on one half of train; its outputs on the other half (out-of-fold) and on calibration.

    One fold instead of K: a CPU LoRA run costs minutes, so the stacker learns the LLM's weight from the
    half it did not train on (its rows in the first half are 'not asked', which the stacker handles).
    The held-out half also drives early stopping and the temperature, as validation data.
    """
    if config.llm is None:
        return {}
    from flockwatch.llm_voter.app import load_core as load_llm
    from flockwatch.llm_voter.config import LoraConfig
    from flockwatch.llm_voter.lora import train_lora

    train_set, staging, components = fitted.train_set, fitted.staging, fitted.components
    half = np.arange(len(train_set)) % 2 == 0
    fit_idx, held_idx = np.flatnonzero(half), np.flatnonzero(~half)
    texts, ys = train_set.texts, train_set.labels
    result = train_lora(
        [texts[i] for i in fit_idx],
        [ys[i] for i in fit_idx],
        [texts[i] for i in held_idx],
        [ys[i] for i in held_idx],
        labels,
        LoraConfig.load(config.llm),
        config.llm_base,
        staging / "llm",
        progress,
    )
    components["llm"] = f"llm-{new_version(config.data.sha256())}"
    write_manifest(staging, Manifest(name=config.name, version="staging", components=components))
    core = load_llm(staging)
    assert core is not None
    progress("LLM voter: out-of-fold outputs on the held-out half of train, and on calibration")
    oof = fitted.oof["llm"] = np.full((len(train_set), len(labels.names)), np.nan)
    oof[held_idx] = opinions_matrix(core.predict([texts[i] for i in held_idx])["llm"], labels.names)
    fitted.cal["llm"] = opinions_matrix(core.predict(fitted.cal_set.texts)["llm"], labels.names)
    return {
        "train_seconds": result.train_seconds,
        "steps": result.steps,
        "best_step": result.best_step,
        "temperature": result.temperature,
        "n_train": result.n_train,
        "invalid_outputs": result.invalid_outputs,
    }


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dump_labels(labels: LabelConfig, staging: Path) -> None:
    _dump_yaml(labels.model_dump(), staging / "labels.yaml")


def _dump_yaml(data: dict[str, Any], path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _reorder(probs: dict[str, np.ndarray], model_classes: list[str], classes: list[str]) -> dict[str, np.ndarray]:
    """Columns in the label config's order (the model's are sorted)."""
    idx = [model_classes.index(c) if c in model_classes else -1 for c in classes]
    out = {}
    for voter, p in probs.items():
        cols = [p[:, i] if i >= 0 else np.zeros(len(p)) for i in idx]
        out[voter] = np.stack(cols, axis=1)
    return out


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    ens = metrics["ensemble"]
    return {k: ens.get(k) for k in ("macro_f1", "ece", "coverage", "selective_error")}


def _f(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def model_card(manifest: Manifest, metrics: dict[str, Any]) -> str:
    """A short human-readable description of the bundle."""
    rows = [
        f"| {name} | {_f(r.get('macro_f1'))} | {_f(r.get('ece'))} | {_f(r.get('coverage'))} | "
        f"{_f(r.get('selective_error'))} |"
        for name, r in [*metrics["voters"].items(), ("**ensemble**", metrics["ensemble"])]
        if r.get("macro_f1") is not None
    ]
    return "\n".join(
        [
            f"# Model card: {manifest.name} {manifest.version}",
            "",
            f"Data sha256 `{manifest.data_sha256}`; splits {manifest.config.get('splits')}.",
            f"Components: {manifest.components}.",
            "",
            "Test-split quality (macro-F1 and ECE on answered texts):",
            "",
            "| model | macro-F1 | ECE | coverage | selective error |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
