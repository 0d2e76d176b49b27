"""Replay the arbiter's fit offline: change how the combiner is chosen or calibrated, see the test-file effect
in seconds instead of retraining the voters (minutes each).

`capture` trains a bundle as `flockwatch train` does and keeps what the arbiter's fit was given (the voters'
out-of-fold outputs, labels, folds, the conformal config) and every voter's opinions on a test file.
`replay` refits the arbiter policy from a capture, as it is (`current`) or with an option changed, and scores
each policy on the test file as `flockwatch eval` would with every tier asked: forced macro-F1, ECE, the
certified coverage on the calibration data, and the coverage and error realized on test.

Usage:
  .venv/bin/python benchmarks/policy_replay.py capture --train train.csv --test test.csv --out DIR [-- TRAIN FLAGS]
  .venv/bin/python benchmarks/policy_replay.py replay DIR [DIR …] [--variants current no-temperature …]
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flockwatch.common.metrics import expected_calibration_error

CAPTURE = "capture.pkl"


def capture(train: Path, test: Path, out: Path, flags: list[str]) -> None:
    """Train on `train` (the CLI's own command, `flags` added), recording the arbiter fit's inputs; then every
    voter's opinions on `test`."""
    from flockwatch.cli.main import app
    from flockwatch.common.datasets import read_table
    from flockwatch.trainer import evaluate, pipeline

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    real = pipeline.fit_policy

    def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    pipeline.fit_policy = recording
    models = out / "models"
    app(["train", "--data", str(train), "--out", str(models), *flags], standalone_mode=False)
    bundle = (models / "current").resolve()
    data = read_table(test, "text", "label")
    policy = evaluate.load_policy(bundle)
    run = evaluate.decide_all(bundle, data.texts, "always", policy=policy)
    record = {
        "calls": calls,
        "bundle": str(bundle),
        "texts": data.texts,
        "labels": data.labels,
        "opinions": run.opinions,
    }
    with (out / CAPTURE).open("wb") as fh:
        pickle.dump(record, fh)
    print(f"{out / CAPTURE}: {len(calls)} arbiter fit(s), {len(data)} test texts")


# A variant changes the captured fit's keyword arguments (and may patch the arbiter for its duration).
Variant = Callable[[dict[str, Any]], dict[str, Any]]
VARIANTS: dict[str, Variant] = {
    "current": lambda kw: kw,
    "no-temperature": lambda kw: {**kw, "serve_temperature": False},
    "temperature": lambda kw: {**kw, "serve_temperature": True},
    "no-blend": lambda kw: kw,  # the rule before the blend: simplest first among the others (see PATCHES)
}


def _without_blend(select: Any) -> Callable[..., Any]:
    real = select.candidates
    return lambda *args, **kwargs: {n: f for n, f in real(*args, **kwargs).items() if n != "blend"}


# Variants that swap an attribute of `flockwatch.arbiter.select` for the fit: attribute → its value there.
PATCHES: dict[str, tuple[str, Callable[[Any], Any]]] = {"no-blend": ("candidates", _without_blend)}


def load(directory: Path) -> dict[str, Any]:
    """A capture written by `capture`."""
    with (directory / CAPTURE).open("rb") as fh:
        record: dict[str, Any] = pickle.load(fh)  # noqa: S301 - our own capture file
    return record


def name_of(directory: Path) -> str:
    """A capture's name in the tables: its set and split folders (e.g. trec/seed0)."""
    return f"{directory.parent.name}/{directory.name}"


def score(record: dict[str, Any], policy: Any) -> dict[str, float]:
    """The policy on the capture's test file, every tier's opinions given (eval's `always`)."""
    from flockwatch.trainer import evaluate
    from sklearn.metrics import f1_score

    texts, labels, opinions = record["texts"], record["labels"], record["opinions"]
    versions = dict.fromkeys(opinions, "replay")
    rounds = np.full(len(texts), len(policy.tiers), dtype=np.int64)
    items = evaluate._items(texts, opinions, versions, range(len(texts)), rounds, False)  # noqa: SLF001
    decisions = policy.decide_many(items)
    classes = policy.classes
    p = np.array([[d.probabilities.get(c, 0.0) for c in classes] for d in decisions])
    y = np.array([classes.index(label) for label in labels])
    top = p.argmax(axis=1)
    answered = np.array([not d.abstain for d in decisions])
    risk = policy.calibration_report["risk"]
    return {
        "macro_f1": float(f1_score(y, top, average="macro")),
        "ece": expected_calibration_error(p, y),  # as `flockwatch eval` reports it
        "certified": float(risk["coverage"]) if risk.get("certified") else 0.0,
        "coverage": float(answered.mean()),
        "error": float((top[answered] != y[answered]).mean()) if answered.any() else 0.0,
        "combiner": policy.calibration_report["combiner"]["chosen"],
    }


def replay(directory: Path, variants: list[str]) -> list[dict[str, Any]]:
    """Each variant's policy refitted from the capture's last arbiter fit, scored on its test file."""
    from flockwatch.arbiter.fit import fit_policy

    record = load(directory)
    args, kwargs = record["calls"][-1]
    rows = []
    from flockwatch.arbiter import select

    for name in variants:
        attribute, value = PATCHES.get(name, (None, None))
        real = getattr(select, attribute) if attribute else None
        if attribute and value:
            setattr(select, attribute, value(select))
        try:
            policy = fit_policy(*args, **VARIANTS[name](dict(kwargs)))
        finally:
            if attribute:
                setattr(select, attribute, real)
        rows.append({"capture": name_of(directory), "variant": name, **score(record, policy)})
    return rows


def candidates_table(directory: Path) -> list[dict[str, Any]]:
    """Every combiner candidate the arbiter compares: its out-of-fold macro-F1 (and the standard error of its gap
    to the best), and the macro-F1 of the same candidate refitted on every row, on the test file."""
    from flockwatch.arbiter import select
    from flockwatch.arbiter.stacker import Stacker
    from flockwatch.common.voting import opinions_matrix

    record = load(directory)
    args, kwargs = record["calls"][-1]
    oof, y, classes, folds = args[0], np.asarray(args[1]), args[4], np.asarray(kwargs["folds"])
    k = len(classes)
    y_test = np.array([classes.index(label) for label in record["labels"]])
    test = {v: opinions_matrix(record["opinions"][v], classes) for v in oof if v in record["opinions"]}
    base = Stacker()
    made = select.candidates(list(oof), base.rare, base)
    probs, scores = {}, {}
    for name, make in made.items():
        probs[name], _ = select.crossfit(make, oof, y, k, folds)
        scores[name] = {}
    select.one_standard_error(y, {n: select.answers(p) for n, p in probs.items()}, scores, k)
    rows = []
    for name, make in made.items():
        fitted = make().fit(oof, y, k)
        p_test = fitted.predict_proba(test)
        scaled = fitted.scale(select.oof_temperature(probs[name], y)).predict_proba(test)
        rows.append(
            {
                "capture": name_of(directory),
                "candidate": name,
                "oof_f1": select.macro_f1(y, select.answers(probs[name]), k),
                "se": scores[name]["se"],
                "test_f1": select.macro_f1(y_test, select.answers(p_test), k),
                "ece": expected_calibration_error(p_test, y_test),
                "ece_t": expected_calibration_error(scaled, y_test),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("capture")
    c.add_argument("--train", type=Path, required=True)
    c.add_argument("--test", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("flags", nargs="*", help="more `flockwatch train` flags (after --)")
    r = sub.add_parser("replay")
    r.add_argument("dirs", nargs="+", type=Path)
    r.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    t = sub.add_parser("candidates")
    t.add_argument("dirs", nargs="+", type=Path)
    args = ap.parse_args(argv)
    if args.command == "candidates":
        print("capture            candidate                 oof_f1      se   test_f1     ece   ece_t")
        for directory in args.dirs:
            for row in candidates_table(directory):
                print(
                    f"{row['capture']:<18} {row['candidate']:<24} "
                    f"{row['oof_f1']:7.4f} {row['se']:7.4f} {row['test_f1']:9.4f} {row['ece']:7.4f} {row['ece_t']:7.4f}"
                )
        return
    if args.command == "capture":
        args.out.mkdir(parents=True, exist_ok=True)
        capture(args.train, args.test, args.out, args.flags)
        return
    keys = ("macro_f1", "ece", "certified", "coverage", "error")
    print("capture            variant          " + "  ".join(f"{k:>9}" for k in keys) + "  combiner")
    for directory in args.dirs:
        for row in replay(directory, args.variants):
            cells = "  ".join(f"{row[k]:9.4f}" for k in keys)
            print(f"{row['capture']:<18} {row['variant']:<16} {cells}  {row['combiner']}")
    sys.stdout.flush()


if __name__ == "__main__":  # spawned fine-tuning workers import this module: only the parent runs
    main()
