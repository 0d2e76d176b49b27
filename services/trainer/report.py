"""Evaluation report of an ensemble run: metrics.json, report.md and its PNG plots."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flockwatch.common.metrics import (
    brier_score,
    coverage_at_risk,
    expected_calibration_error,
    f1_by_class,
    has_opinion,
    macro_average,
    maximum_calibration_error,
    or_none,
)
from flockwatch.trainer import plots
from mapie.metrics.classification import classification_coverage_score, classification_mean_width_score
from mapie.metrics.uncertainty import auarc
from numpy.typing import NDArray
from sklearn.metrics import confusion_matrix

# The progress steps of write_report, in order (a CLI progress bar can use len(REPORT_STEPS) as its total).
REPORT_STEPS = ("metrics", "f1", "slices", "reliability", "risk_coverage", "confusion", "voter_usage", "report")
IN_SAMPLE_NOTE = (
    "coverage_at_risk_target is read off each model's in-sample risk–coverage curve (answering its most "
    "confident texts first) on these very texts: an estimate, not a guarantee."
)


@dataclass
class EvalInputs:
    """Everything an evaluation run produced for n labelled texts; NaN probability rows are abstentions."""

    classes: list[str]
    y_true: list[str]
    voters: dict[str, np.ndarray]
    ensemble: np.ndarray
    answered: np.ndarray
    prediction_sets: list[list[str]]
    paths: list[str]
    voters_used: list[list[str]]
    llm_called: np.ndarray
    slices: dict[str, list[int]]
    risk_target: float = 0.01
    set_level: float = 0.9
    baselines: dict[str, np.ndarray] = field(default_factory=dict)
    abstain_reasons: list[str | None] = field(default_factory=list)
    cascade: dict[str, Any] = field(default_factory=dict)  # rounds reached, measured CPU cost
    y: NDArray[np.int64] = field(init=False, repr=False)  # y_true as class indices

    def __post_init__(self) -> None:
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted((set(self.y_true) | {c for s in self.prediction_sets for c in s}) - index.keys())
        if unknown:
            raise ValueError(f"labels not among the classes {self.classes}: {unknown}")
        n, k = len(self.y_true), len(self.classes)
        self.y = np.array([index[label] for label in self.y_true], dtype=np.int64)
        for name, p in {"ensemble": self.ensemble, **self.voters, **self.baselines}.items():
            if np.shape(p) != (n, k):
                raise ValueError(f"{name}: probabilities must have shape ({n}, {k}); got {np.shape(p)}")
        self.ensemble = np.asarray(self.ensemble, dtype=np.float64)
        self.voters = {name: np.asarray(p, dtype=np.float64) for name, p in self.voters.items()}
        self.baselines = {name: np.asarray(p, dtype=np.float64) for name, p in self.baselines.items()}
        self.answered = np.asarray(self.answered, dtype=bool)
        self.llm_called = np.asarray(self.llm_called, dtype=bool)
        per_text: dict[str, Sized] = {"answered": self.answered, "prediction_sets": self.prediction_sets}
        per_text |= {"paths": self.paths, "voters_used": self.voters_used, "llm_called": self.llm_called}
        for name, values in per_text.items():
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} texts")

    def models(self) -> dict[str, NDArray[np.float64]]:
        """Probabilities of every voter, baseline and the ensemble, by name."""
        return {**self.voters, **self.baselines, "ensemble": self.ensemble}


def _model_metrics(p: NDArray[np.float64], y: NDArray[np.int64], classes: list[str], target: float) -> dict[str, Any]:
    """Quality of one voter or baseline on the texts where it gave probabilities."""
    p = np.asarray(p, dtype=np.float64)
    scored = has_opinion(p)
    pred = np.nan_to_num(p).argmax(axis=1)
    per_class = f1_by_class(y[scored], pred[scored], classes)
    return {
        "n_scored": int(scored.sum()),
        "macro_f1": macro_average(per_class),
        "per_class_f1": per_class,
        "ece": or_none(expected_calibration_error(p, y)),
        "mce": or_none(maximum_calibration_error(p, y)),
        "brier": or_none(brier_score(p[scored], y[scored])),
        "coverage": float(scored.mean()) if len(y) else 0.0,
        "selective_error": float((pred[scored] != y[scored]).mean()) if scored.any() else None,
        "coverage_at_risk_target": coverage_at_risk(p, y, target),
    }


def _set_metrics(inputs: EvalInputs) -> dict[str, Any]:
    """Empirical coverage and size of the prediction sets (MAPIE's metrics)."""
    members = np.array([[c in s for c in inputs.classes] for s in inputs.prediction_sets], dtype=bool)
    if not len(members):
        return {"set_level": inputs.set_level, "set_coverage": None, "set_size_mean": None, "singleton_rate": None}
    sizes = members.sum(axis=1)
    return {
        "set_level": inputs.set_level,
        "set_coverage": float(classification_coverage_score(inputs.y, members)[0]),
        "set_size_mean": float(classification_mean_width_score(members[:, :, None])[0]),
        "singleton_rate": float((sizes == 1).mean()),
        "empty_set_rate": float((sizes == 0).mean()),
    }


def _slice_metrics(inputs: EvalInputs, pred: NDArray[np.int64], ans: NDArray[np.bool_]) -> dict[str, Any]:
    """Ensemble quality per slice: macro-F1 on answered members, coverage and selective error."""
    out: dict[str, Any] = {}
    for name, members in inputs.slices.items():
        idx = np.asarray(members, dtype=np.int64)
        chosen = idx[ans[idx]]
        scored = idx[has_opinion(inputs.ensemble[idx])]
        out[name] = {
            "n": len(idx),
            "macro_f1": macro_average(f1_by_class(inputs.y[chosen], pred[chosen], inputs.classes)),
            "macro_f1_all": macro_average(f1_by_class(inputs.y[scored], pred[scored], inputs.classes)),
            "coverage": len(chosen) / len(idx) if len(idx) else 0.0,
            "selective_error": float((pred[chosen] != inputs.y[chosen]).mean()) if len(chosen) else None,
        }
    return out


def _ensemble_metrics(inputs: EvalInputs, slices: dict[str, Any]) -> dict[str, Any]:
    """Quality of the arbiter's decisions: answered-text F1, calibration, selectivity, sets, paths, usage."""
    y, p, n, classes = inputs.y, inputs.ensemble, len(inputs.y), inputs.classes
    scored = has_opinion(p)
    ans = inputs.answered & scored  # an answer without probabilities cannot be scored
    pred = np.nan_to_num(p).argmax(axis=1)
    base = _model_metrics(p, y, classes, inputs.risk_target)
    per_class = f1_by_class(y[ans], pred[ans], classes)
    ranked = [(s["macro_f1"], name) for name, s in slices.items() if s["macro_f1"] is not None]
    worst = min(ranked) if ranked else (None, None)
    correct = (pred[scored] == y[scored]).astype(int)
    voter_names = list(dict.fromkeys([*inputs.voters, *(v for used in inputs.voters_used for v in used)]))
    return {
        **{k: base[k] for k in ("n_scored", "ece", "mce", "brier", "coverage_at_risk_target")},
        "n_answered": int(ans.sum()),
        "macro_f1": macro_average(per_class),
        "macro_f1_all": base["macro_f1"],
        "per_class_f1": per_class,
        "coverage": float(ans.mean()) if n else 0.0,
        "selective_error": float((pred[ans] != y[ans]).mean()) if ans.any() else None,
        "auarc": auarc(correct, p[scored].max(axis=1)) if scored.any() else None,
        **_set_metrics(inputs),
        "worst_slice_f1": worst[0],
        "worst_slice": worst[1],
        "llm_call_rate": float(inputs.llm_called.mean()) if n else 0.0,
        "cascade": inputs.cascade,
        "paths": dict(Counter(inputs.paths)),
        "voter_usage": {v: sum(v in used for used in inputs.voters_used) / max(n, 1) for v in voter_names},
        "abstain_reasons": dict(Counter(r for r in inputs.abstain_reasons if r is not None)),
        "confusion_matrix": confusion_matrix(y[ans], pred[ans], labels=list(range(len(classes)))).tolist()
        if ans.any()
        else [[0] * len(classes) for _ in classes],
    }


def _each(inputs: EvalInputs, probs: dict[str, NDArray[np.float64]]) -> dict[str, Any]:
    return {name: _model_metrics(p, inputs.y, inputs.classes, inputs.risk_target) for name, p in probs.items()}


def compute_metrics(inputs: EvalInputs) -> dict[str, Any]:
    """The metrics.json content: the ensemble, every voter and baseline, and every slice."""
    scored = has_opinion(inputs.ensemble)
    pred = np.nan_to_num(inputs.ensemble).argmax(axis=1)
    slices = _slice_metrics(inputs, pred, inputs.answered & scored)

    metrics = {
        "n": len(inputs.y),
        "classes": inputs.classes,
        "risk_target": inputs.risk_target,
        "ensemble": _ensemble_metrics(inputs, slices),
        "voters": _each(inputs, inputs.voters),
        "baselines": _each(inputs, inputs.baselines),
        "slices": slices,
        "notes": {"coverage_at_risk_target": IN_SAMPLE_NOTE},
    }
    strict: dict[str, Any] = json.loads(json.dumps(metrics, allow_nan=False))  # no NaN, plain Python types
    return strict


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows])


def _markdown(m: dict[str, Any], title: str) -> str:
    """The report: headline, per-model and calibration tables, slices, sets and usage, with the plots."""
    e = m["ensemble"]
    models = {**m["voters"], **{f"{k} (baseline)": v for k, v in m["baselines"].items()}, "ensemble": e}
    cols = ["macro_f1", "coverage", "selective_error", "coverage_at_risk_target"]
    quality = _table(["model", *cols], [[name, *(r.get(c) for c in cols)] for name, r in models.items()])
    calibration = _table(
        ["model", "ECE", "MCE", "Brier"], [[k, r["ece"], r["mce"], r["brier"]] for k, r in models.items()]
    )
    slice_rows = [[k, s["n"], s["macro_f1"], s["coverage"], s["selective_error"]] for k, s in m["slices"].items()]
    slices = _table(["slice", "n", "macro_f1", "coverage", "selective_error"], slice_rows) if slice_rows else "none"
    sets = ["set_level", "set_coverage", "set_size_mean", "singleton_rate", "empty_set_rate", "auarc"]
    usage = [[f"voter used: {k}", v] for k, v in e["voter_usage"].items()] + [["LLM call rate", e["llm_call_rate"]]]
    usage += [[f"path: {k}", v] for k, v in e["paths"].items()]
    usage += [[f"abstained: {k}", v] for k, v in e["abstain_reasons"].items()]
    return "\n\n".join(
        [
            f"# {title}",
            f"{m['n']} texts, classes {', '.join(m['classes'])}. Risk target {m['risk_target']:g}. "
            f"The ensemble answered {_fmt(e['coverage'])} of the texts with selective error "
            f"{_fmt(e['selective_error'])} and macro-F1 {_fmt(e['macro_f1'])} (forced answers on all texts with "
            f"votes: {_fmt(e['macro_f1_all'])}); worst slice: {e['worst_slice']} ({_fmt(e['worst_slice_f1'])}).",
            "## Quality\n\nVoters on the texts they voted on; the ensemble on the texts it answered.\n\n" + quality,
            "![F1 per class](f1.png)",
            "## Calibration\n\nTop-label, 15 equal-width bins, rows with probabilities.\n\n" + calibration,
            "![Reliability](reliability.png)",
            f"## Selective prediction\n\n{IN_SAMPLE_NOTE}\n\n![Risk–coverage](risk_coverage.png)",
            "## Prediction sets\n\n" + _table(["metric", "value"], [[k, e.get(k)] for k in sets]),
            "## Slices\n\n" + slices + "\n\n![Slices](slices.png)",
            "## Confusion (answered texts)\n\n![Confusion](confusion.png)",
            "## Arbiter\n\n" + _table(["what", "value"], usage) + "\n\n![Voter usage](voter_usage.png)",
            *([_cascade_section(e["cascade"])] if e.get("cascade") else []),
        ]
    )


def _cascade_section(cascade: dict[str, Any]) -> str:
    """Rounds reached and measured CPU cost (process time, so a multi-threaded voter counts every thread)."""
    rounds = [[r["tier"], ", ".join(r["voters"]), r["reach"]] for r in cascade["rounds"]]
    costs = [[voter, ms] for voter, ms in cascade["voter_cpu_ms_per_text"].items()]
    return "\n\n".join(
        [
            "## Cascade\n\nShare of texts reaching each round, cheapest first.",
            _table(["round", "voters", "reach"], rounds),
            "Measured CPU-ms per text each voter scored; the whole run (voters and arbiter): "
            f"{_fmt(cascade['cpu_ms_per_text'])} CPU-ms per text.",
            _table(["voter", "CPU-ms per text"], costs),
        ]
    )


def write_report(
    inputs: EvalInputs,
    out: Path,
    progress: Callable[[str], None] = lambda _: None,
    title: str = "Flockwatch evaluation",
) -> dict[str, Any]:
    """Write out/metrics.json, out/report.md and its PNGs; return the metrics."""
    out.mkdir(parents=True, exist_ok=True)
    progress("metrics")
    metrics = compute_metrics(inputs)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    e, models = metrics["ensemble"], {**metrics["voters"], **metrics["baselines"], "ensemble": metrics["ensemble"]}
    steps: list[tuple[str, Callable[[], Path]]] = [
        ("f1", lambda: plots.f1_bars(models, inputs.classes, out / "f1.png")),
        ("slices", lambda: plots.slice_bars(metrics["slices"], e["worst_slice"], out / "slices.png")),
        ("reliability", lambda: plots.reliability(inputs.models(), inputs.y, out / "reliability.png")),
        (
            "risk_coverage",
            lambda: plots.risk_coverage_plot(
                inputs.models(), inputs.y, inputs.risk_target, e, out / "risk_coverage.png"
            ),
        ),
        ("confusion", lambda: plots.confusion(e["confusion_matrix"], inputs.classes, out / "confusion.png")),
        ("voter_usage", lambda: plots.voter_usage(e, out / "voter_usage.png")),
    ]
    for step, draw in steps:
        progress(step)
        draw()
    progress("report")
    (out / "report.md").write_text(_markdown(metrics, title) + "\n")
    return metrics
