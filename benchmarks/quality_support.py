"""Helpers of benchmarks/quality.py: splits, the ten-line baseline, the CLI runs, summaries and tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
FLOCKWATCH = str(Path(sys.executable).with_name("flockwatch"))
CONFORMAL = Path(__file__).with_name("quality_conformal.yaml")
VARIANTS = ("default", "frozen", "cheap", "rules", "finetune")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
BOX = " │╭╮╰╯─┃━┏┓┗┛"  # rich's frame characters, stripped from a failed command's log lines
MIN_CLASS = 5  # a class needs this many texts to be split 60/40 and cross-fitted


@dataclass(frozen=True)
class Job:
    """One unit of work: the baseline on a split, or one ensemble variant trained and evaluated on it."""

    kind: str  # "baseline" or "ensemble"
    set: str
    seed: int
    variant: str  # "" for the baseline
    split: Path  # the folder holding train.csv and test.csv
    flags: tuple[str, ...] = ()
    threads: int = 1
    certify: bool = True  # baseline: also the coverage certified with the ensemble's statistics
    conformal: Path = CONFORMAL  # the conformal.yaml both are certified with


def load_set(path: Path) -> pd.DataFrame:
    """A text,label CSV without empty rows, repeated texts (first kept) or classes too small to split."""
    df = pd.read_csv(path, usecols=["text", "label"], dtype=str, keep_default_na=False)
    df = df[(df.text.str.strip() != "") & (df.label != "")].drop_duplicates("text")
    counts = df.label.value_counts()
    small = sorted(counts[counts < MIN_CLASS].index)
    if small:
        print(f"{path}: dropped classes with < {MIN_CLASS} texts: {small}", file=sys.stderr)
    return df[~df.label.isin(small)].reset_index(drop=True)


def write_split(df: pd.DataFrame, seed: int, folder: Path) -> Path:
    """The stratified 60/40 split of one seed, as folder/train.csv and folder/test.csv."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(df, test_size=0.4, stratify=df.label, random_state=seed)
    folder.mkdir(parents=True, exist_ok=True)
    train.to_csv(folder / "train.csv", index=False)
    test.to_csv(folder / "test.csv", index=False)
    return folder


def baseline_model() -> Any:
    """The ten-line baseline: word 1–2 and char_wb 2–5 TF-IDF, logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    words = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)
    return make_pipeline(make_union(words, chars), LogisticRegression(C=10, max_iter=2000))


def _proba(model: Any, texts: np.ndarray, k: int) -> np.ndarray:
    """Probabilities over all k classes (a class missing from the fit gets 0)."""
    p = np.zeros((len(texts), k))
    p[:, model.classes_] = model.predict_proba(texts)
    return p


def run_baseline(job: Job) -> dict[str, Any]:
    """Fit the baseline on train.csv; macro-F1, ECE and (optionally) certified coverage on test.csv."""
    from flockwatch.common.metrics import expected_calibration_error
    from sklearn.metrics import f1_score
    from threadpoolctl import threadpool_limits

    train, test = pd.read_csv(job.split / "train.csv", dtype=str), pd.read_csv(job.split / "test.csv", dtype=str)
    classes = sorted(set(train.label))
    y, y_test = (np.array([classes.index(c) for c in d.label]) for d in (train, test))
    texts = train.text.to_numpy()
    with threadpool_limits(job.threads):
        start = time.perf_counter()
        p = _proba(baseline_model().fit(texts, y), test.text.to_numpy(), len(classes))
        out: dict[str, Any] = {"baseline_fit_s": time.perf_counter() - start}
        out["baseline_macro_f1"] = float(f1_score(y_test, p.argmax(1), average="macro"))
        out["baseline_ece"] = expected_calibration_error(p, y_test)
        if job.certify:
            try:
                out |= _certify(texts, y, p, y_test, job.seed, job.conformal)
            except Exception as exc:  # the arbiter's API is changing; the rest of the row still counts
                out["baseline_cert_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _certify(
    texts: np.ndarray, y: np.ndarray, p: np.ndarray, y_test: np.ndarray, seed: int, conformal: Path
) -> dict[str, Any]:
    """The arbiter's learn-then-test on the baseline's 5-fold out-of-fold scores; its threshold applied to test."""
    from flockwatch.arbiter.config import ConformalConfig
    from flockwatch.arbiter.risk import Stage, choose_thresholds
    from sklearn.model_selection import StratifiedKFold

    risk, k = ConformalConfig.load(conformal).risk, p.shape[1]
    oof = np.zeros((len(y), k))
    for fit, held in StratifiedKFold(5, shuffle=True, random_state=seed).split(texts, y):
        oof[held] = _proba(baseline_model().fit(texts[fit], y[fit]), texts[held], k)
    stage = Stage(confidence=oof.max(1), prediction=oof.argmax(1), singleton=np.ones(len(y), dtype=bool))
    loss = 1.0 - np.eye(k)
    choice = choose_thresholds([stage], y, loss, risk.target, risk.delta, risk.grid, starts=risk.starts)
    answered = p.max(1) >= choice.answer_at
    wrong = p.argmax(1)[answered] != y_test[answered]
    return {
        "baseline_certified": bool(choice.certified),
        "baseline_cal_coverage": float(choice.coverage),
        "baseline_coverage": float(answered.mean()),
        "baseline_selective_error": float(wrong.mean()) if answered.any() else None,
    }


def has_finetune() -> bool:
    """Whether this checkout's `flockwatch train` offers --finetune."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    done = subprocess.run([FLOCKWATCH, "train", "--help"], capture_output=True, text=True, env=env, check=False)
    return "--finetune" in done.stdout


def variant_flags(variant: str, name: str, finetune: bool) -> tuple[str, ...] | str:
    """The `flockwatch train` flags of a variant, or why it is skipped for this set."""
    if variant == "default":
        return ()
    if variant == "frozen":  # the MiniLM voter frozen (a calibrated head on its embeddings): the earlier default
        return ("--no-finetune",)
    if variant == "cheap":  # the TF-IDF voters only: what `default` was before the embedding voter joined it
        return ("--no-embedding",)
    if variant == "finetune":
        return ("--finetune",) if finetune else "skipped: `flockwatch train --help` shows no --finetune yet"
    folder = ROOT / "configs" / name
    files = [(f"--{kind}", folder / f"{kind}.yaml") for kind in ("labels", "rules", "lfs", "slices")]
    flags = tuple(x for flag, path in files if path.exists() for x in (flag, str(path)))
    return flags or f"skipped: no configs/{name}/*.yaml"


def _call(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> float:
    """Run one CLI command into a log; wall seconds, or RuntimeError with the log's tail."""
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, check=False).returncode
    if rc:
        lines = [line.strip(BOX).strip() for line in log.read_text(errors="replace").splitlines()]
        tail = " | ".join([line for line in lines if line][-2:])
        raise RuntimeError(f"flockwatch {cmd[1]} exited {rc} (log: {log}): {tail}")
    return time.perf_counter() - start


def run_ensemble(job: Job) -> dict[str, Any]:
    """`flockwatch train` on train.csv and `flockwatch eval --all` on test.csv, as a user runs them."""
    work = job.split / job.variant
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **dict.fromkeys(THREAD_VARS, str(job.threads)), "COLUMNS": "160", "NO_COLOR": "1"}
    models, split = work / "models", job.split
    train = [FLOCKWATCH, "train", "--data", str(split / "train.csv"), "--out", str(models), *job.flags]
    train_s = _call([*train, "--conformal", str(job.conformal)], env, work / "train.log", work)
    evaluate = [FLOCKWATCH, "eval", "--models", str(models / "current"), "--data", str(split / "test.csv")]
    eval_s = _call([*evaluate, "--out", str(work / "eval"), "--all"], env, work / "eval.log", work)
    metrics = read_metrics(work / "eval" / "metrics.json", models / "current" / "metrics.json")
    return {**metrics, "train_s": train_s, "eval_s": eval_s}


def read_metrics(evaluated: Path, bundle: Path) -> dict[str, Any]:
    """The row's ensemble columns from eval's metrics.json and the bundle's calibration report."""
    m = json.loads(evaluated.read_text())
    e = m["ensemble"]
    risk = json.loads(bundle.read_text()).get("calibration", {}).get("risk", {})
    voters = {n: v for n, v in m.get("voters", {}).items() if v.get("macro_f1") is not None}
    full = {n: v for n, v in voters.items() if v.get("coverage", 0.0) >= 0.999} or voters  # voted on every text
    best = max(full, key=lambda n: full[n]["macro_f1"], default=None)
    return {
        "macro_f1_all": e.get("macro_f1_all"),
        "macro_f1_answered": e.get("macro_f1"),
        "best_voter": best,
        "best_voter_macro_f1": full[best]["macro_f1"] if best else None,
        "voters_macro_f1": {n: v["macro_f1"] for n, v in voters.items()},
        "ece": e.get("ece"),
        "coverage": e.get("coverage"),
        "n_answered": e.get("n_answered"),
        "n_test": m.get("n"),
        "n_scored": e.get("n_scored"),  # texts the ensemble gave probabilities for (forced F1's denominator)
        "selective_error": e.get("selective_error"),
        "certified": risk.get("certified"),
        "cal_coverage": risk.get("coverage"),
        "cal_n": risk.get("n"),
        "cpu_ms_per_text": (e.get("cascade") or {}).get("cpu_ms_per_text"),
    }


def run_job(job: Job) -> dict[str, Any]:
    """Run a job in a worker process; the result carries the job, its seconds and any error."""
    start = time.perf_counter()
    head = {k: v for k, v in asdict(job).items() if k in ("kind", "set", "seed", "variant")}
    try:
        out = run_baseline(job) if job.kind == "baseline" else run_ensemble(job)
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"}
    return {**head, **out, "seconds": time.perf_counter() - start}


def stats(values: list[Any]) -> dict[str, Any] | None:
    """Mean, sample sd and count of the non-missing values; None when there are none."""
    xs = np.array([v for v in values if v is not None], dtype=float)
    if not len(xs):
        return None
    return {"mean": float(xs.mean()), "sd": float(xs.std(ddof=1)) if len(xs) > 1 else 0.0, "n": len(xs)}


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers rounded, mean ± sd for stats, – for missing."""
    if value is None:
        return "–"
    if isinstance(value, dict):
        sd = f" ± {value['sd']:.{digits}f}" if value["n"] > 1 else ""
        return f"{value['mean']:.{digits}f}{sd}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])
