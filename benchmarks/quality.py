"""The honest quality benchmark: the ten-line baseline against the Flockwatch ensemble on separate test files.

For each data set and seed, a stratified 60/40 split is written as train.csv and test.csv. The baseline
(word + char TF-IDF, logistic regression) fits on train.csv. The ensemble is trained and evaluated through
the CLI, as a user would: `flockwatch train --data train.csv … --conformal benchmarks/quality_conformal.yaml`,
then `flockwatch eval --data test.csv --all`. Nothing sees test.csv before the test. `--validity N` trains
the cheap variant on N splits per set and counts the splits whose realized selective error on test is above
the target: the guarantee (error ≤ target with probability ≥ 1 − δ) allows about a δ share of them.

Usage: .venv/bin/python benchmarks/quality.py [--sets sms trec] [--data NAME=PATH …] [--seeds 0 1 2]
           [--variants default frozen cheap rules finetune] [--validity 20] [--jobs 2] [--keep]
           [--out benchmarks/results/quality.json]          (the table also goes to the .md next to it)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from quality_support import (
    CONFORMAL,
    ROOT,
    VARIANTS,
    Job,
    fmt,
    has_finetune,
    load_set,
    run_job,
    stats,
    table,
    variant_flags,
    write_split,
)

RESULTS = ROOT / "benchmarks" / "results"
SUMMARY_KEYS = (
    *("baseline_macro_f1", "macro_f1_all", "delta_macro_f1", "best_voter_macro_f1", "baseline_ece", "ece"),
    *("coverage", "selective_error", "baseline_coverage", "baseline_selective_error", "cpu_ms_per_text", "train_s"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sets", nargs="*", default=["sms", "trec"], help="bundled sets: data/NAME.csv")
    ap.add_argument("--data", nargs="*", default=[], metavar="NAME=PATH", help="more CSV sets (text,label)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="splits compared (none: validity only)")
    ap.add_argument("--variants", nargs="*", choices=VARIANTS, default=["default", "frozen"])
    ap.add_argument("--validity", type=int, default=0, metavar="N", help="N splits per set, default variant")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="jobs at once (≤ cores)")
    ap.add_argument("--no-baseline-cert", action="store_true", help="skip the baseline's certified coverage")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (splits, bundles, logs)")
    ap.add_argument("--work", type=Path, help="the work folder (default: a new temporary one)")
    ap.add_argument("--conformal", type=Path, default=CONFORMAL, help="the conformal.yaml (risk target) used")
    ap.add_argument("--train-flags", default="", help="more `flockwatch train` flags for every ensemble run")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = ap.parse_args(argv)
    args.conformal = args.conformal.resolve()  # the jobs run in their own folders
    args.jobs = max(1, min(args.jobs, os.cpu_count() or 1))
    if 0 < args.validity < 20:
        print(f"--validity {args.validity}: fewer than 20 splits say little about a δ share", file=sys.stderr)
    return args


def data_sets(args: argparse.Namespace) -> dict[str, Path]:
    """Every set to run, by name: the bundled ones asked for and the --data ones."""
    sets = {name: ROOT / "data" / f"{name}.csv" for name in args.sets}
    for item in args.data:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--data wants NAME=PATH, got {item!r}")
        sets[name] = Path(path).resolve()
    missing = [str(p) for p in sets.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"no such data file: {', '.join(missing)} (the bundled sets come from `make data`)")
    return sets


def plan(args: argparse.Namespace, sets: dict[str, Path], work: Path) -> tuple[list[Job], list[dict[str, Any]]]:
    """Write every split; the jobs (longest first) and the rows of skipped variants."""
    finetune = "finetune" in args.variants and has_finetune()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs, skipped = [], []
    for name, path in sets.items():
        df = load_set(path)
        for seed in sorted(set(args.seeds) | set(range(args.validity))):
            split = write_split(df, seed, work / name / f"seed{seed}")
            variants = list(args.variants) if seed in args.seeds else []
            variants += ["default"] if seed < args.validity and "default" not in variants else []
            certify, conformal = not args.no_baseline_cert, args.conformal
            jobs.append(Job("baseline", name, seed, "", split, threads=threads, certify=certify, conformal=conformal))
            for variant in variants:
                flags = variant_flags(variant, name, finetune)
                if isinstance(flags, str):
                    skipped.append({"set": name, "seed": seed, "variant": variant, "skipped": flags})
                else:
                    flags = (*flags, *shlex.split(args.train_flags))
                    jobs.append(Job("ensemble", name, seed, variant, split, flags, threads, conformal=args.conformal))
    order = {"finetune": 0, "default": 0, "rules": 1, "frozen": 2, "cheap": 3, "": 4}
    return sorted(jobs, key=lambda job: order[job.variant]), skipped


def _estimate(job: Job, done: list[dict[str, Any]]) -> float:
    """Seconds a job should take, from the most similar jobs finished so far."""
    similar = [
        [r["seconds"] for r in done if (r["kind"], r["variant"], r["set"]) == (job.kind, job.variant, job.set)],
        [r["seconds"] for r in done if (r["kind"], r["variant"]) == (job.kind, job.variant)],
        [r["seconds"] for r in done],
    ]
    return float(np.mean(next(s for s in similar if s)))


def execute(jobs: list[Job], n: int) -> list[dict[str, Any]]:
    """Run the jobs, n at once; print each as it ends, with an ETA from the times measured so far."""
    done: list[dict[str, Any]] = []
    with ProcessPoolExecutor(n) as pool:
        pending = {pool.submit(run_job, job): job for job in jobs}
        for future in as_completed(list(pending)):
            pending.pop(future)
            r = future.result()
            done.append(r)
            eta = sum(_estimate(job, done) for job in pending.values()) / n
            what = f"{r['set']} seed {r['seed']} {r['variant'] or 'baseline'}"
            error = f"  ERROR {r['error']}" if "error" in r else ""
            print(
                f"[{len(done)}/{len(jobs)}] {what}: {r['seconds']:.0f} s; ETA ≈ {eta / 60:.1f} min{error}", flush=True
            )
    return done


def rows_of(results: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (set, seed, variant): the ensemble's columns next to its split's baseline."""
    base = {(r["set"], r["seed"]): r for r in results if r["kind"] == "baseline"}
    rows = []
    for r in (r for r in results if r["kind"] == "ensemble"):
        b = base.get((r["set"], r["seed"]), {})
        row = {k: v for k, v in r.items() if k != "kind"}
        row |= {k: v for k, v in b.items() if k.startswith("baseline_")}
        row |= {"baseline_s": b.get("seconds")} | ({"baseline_error": b["error"]} if "error" in b else {})
        if row.get("macro_f1_all") is not None and row.get("baseline_macro_f1") is not None:
            row["delta_macro_f1"] = row["macro_f1_all"] - row["baseline_macro_f1"]
        rows.append(row)
    order = {v: i for i, v in enumerate(VARIANTS)}
    return sorted(rows + skipped, key=lambda r: (r["set"], order[r["variant"]], r["seed"]))


def summarize(rows: list[dict[str, Any]], seeds: list[int]) -> list[dict[str, Any]]:
    """Mean ± sd over the compared seeds, per set and variant."""
    out = []
    for key in dict.fromkeys((r["set"], r["variant"]) for r in rows if r["seed"] in seeds):
        group = [r for r in rows if (r["set"], r["variant"]) == key and r["seed"] in seeds]
        ok = [r for r in group if r.get("macro_f1_all") is not None]
        entry: dict[str, Any] = {"set": key[0], "variant": key[1], "runs": len(ok), "of": len(group)}
        entry |= {k: stats([r.get(k) for r in ok]) for k in SUMMARY_KEYS}
        entry["certified"] = f"{sum(bool(r.get('certified')) for r in ok)}/{len(ok)}"
        entry["best_voters"] = sorted({r["best_voter"] for r in ok if r.get("best_voter")})
        entry["not_run"] = sorted({r.get("skipped") or r.get("error", "") for r in group if r not in ok})
        out.append(entry)
    return out


def _exceed(runs: list[dict[str, Any]], prefix: str, target: float, delta: float) -> dict[str, Any]:
    """How often the realized selective error on test went above the target, among splits that answered."""
    from scipy.stats import binomtest

    answered = [r for r in runs if r.get(prefix + "selective_error") is not None and r.get(prefix + "coverage")]
    over = [r["seed"] for r in answered if r[prefix + "selective_error"] > target]
    test = binomtest(len(over), len(answered), delta, alternative="greater") if answered else None
    beyond = [_true_risk_above(r, prefix, target) for r in answered]
    return {
        "splits": len(runs),
        "answered_splits": len(answered),
        "certified": sum(bool(r.get(prefix + "certified")) for r in runs),
        "exceeded": len(over),
        "exceeded_seeds": over,
        "share_exceeded": len(over) / len(answered) if answered else None,
        "p_share_above_delta": float(test.pvalue) if test else None,  # one-sided binomial test against δ
        # the test error is an estimate: the mean posterior chance (uniform prior) that a split's true risk > target
        "est_share_true_risk_above": float(np.mean(beyond)) if beyond else None,
        "coverage": stats([r.get(prefix + "coverage") for r in runs]),
        "selective_error": stats([r.get(prefix + "selective_error") for r in answered]),
    }


def _true_risk_above(row: dict[str, Any], prefix: str, target: float) -> float:
    """P(true selective error > target | the errors seen among the answered test texts), Beta(1, 1) prior."""
    from scipy.stats import beta

    n = round(row[prefix + "coverage"] * row["n_test"]) if "n_test" in row else 0
    errors = round(row[prefix + "selective_error"] * n)
    return float(beta.sf(target, errors + 1, n - errors + 1)) if n else float("nan")


def validity(rows: list[dict[str, Any]], n: int, risk: dict[str, Any]) -> list[dict[str, Any]]:
    """Per set: the ensemble's (and the baseline's) out-of-sample check of the certified target."""
    out = []
    for name in dict.fromkeys(r["set"] for r in rows):
        runs = [r for r in rows if (r["set"], r["variant"]) == (name, "default") and r["seed"] < n]
        runs = [r for r in runs if r.get("macro_f1_all") is not None]
        entry = {"set": name, "target": risk["target"], "delta": risk["delta"]}
        out.append(entry | {"ensemble": _exceed(runs, "", risk["target"], risk["delta"])})
        if any("baseline_certified" in r for r in runs):
            out[-1]["baseline"] = _exceed(runs, "baseline_", risk["target"], risk["delta"])
    return out


def markdown(report: dict[str, Any]) -> str:
    """The tables of a report."""
    seeds, risk, machine = report["config"]["seeds"], report["config"]["conformal"]["risk"], report["machine"]
    rows = [r for r in report["rows"] if r["seed"] in seeds]
    per_split = table(
        ["set", "seed", "variant", "baseline F1", "ensemble F1 (all)", "Δ", "best voter", "ECE base / ens"]
        + ["coverage", "sel. error", "certified", "baseline cov. / err.", "CPU-ms/text", "train s"],
        [
            [r["set"], r["seed"], r["variant"], r.get("baseline_macro_f1"), r.get("macro_f1_all")]
            + [r.get("delta_macro_f1"), f"{r.get('best_voter')} {fmt(r.get('best_voter_macro_f1'))}"]
            + [f"{fmt(r.get('baseline_ece'))} / {fmt(r.get('ece'))}", r.get("coverage"), r.get("selective_error")]
            + [r.get("certified"), f"{fmt(r.get('baseline_coverage'))} / {fmt(r.get('baseline_selective_error'))}"]
            + [fmt(r.get("cpu_ms_per_text"), 2), fmt(r.get("train_s"), 0)]
            for r in rows
            if "skipped" not in r and "error" not in r
        ],
    )
    summary = table(
        ["set", "variant", "runs", "baseline F1", "ensemble F1 (all)", "Δ vs baseline", "best voter F1"]
        + ["ECE ens", "coverage", "sel. error", "certified", "baseline cov.", "CPU-ms/text", "train s"],
        [
            [s["set"], s["variant"], f"{s['runs']}/{s['of']}", s["baseline_macro_f1"], s["macro_f1_all"]]
            + [s["delta_macro_f1"], s["best_voter_macro_f1"], s["ece"], s["coverage"], s["selective_error"]]
            + [s["certified"], s["baseline_coverage"], fmt(s["cpu_ms_per_text"], 2), fmt(s["train_s"], 0)]
            for s in report["summary"]
        ],
    )
    parts = [
        "# Quality: the ten-line baseline vs the Flockwatch ensemble (separate train.csv / test.csv)",
        f"Commit {report['commit'][:12]}{' (uncommitted changes)' if report['dirty'] else ''}, "
        f"{report['date']}, {machine['cores']} cores (load {machine['load_avg_start'][0]:.1f} at the start), "
        f"{report['jobs']} job(s) at once, {report['wall_s'] / 60:.1f} min. "
        f"Stratified 60/40 splits{f', seeds {seeds}' if seeds else ''}; "
        f"risk target {risk['target']:g}, δ {risk['delta']:g} "
        f"({report['config']['conformal_file']}). F1 is macro-F1 on test.csv; the ensemble's is forced (every text "
        "answered). Coverage and selective error: the ensemble's answered share of test.csv and its error there; "
        "baseline cov./err.: the baseline's scores under the same learn-then-test on its 5-fold out-of-fold "
        "scores. Best voter: the best of the voters that voted on every test text. CPU-ms per text: "
        "`flockwatch eval`'s measure.",
    ]
    parts += ["## Summary (mean ± sd over seeds)\n\n" + summary, "## Per split\n\n" + per_split] if rows else []
    not_run = [r for r in report["rows"] if "skipped" in r or "error" in r]
    if not_run:
        lines = [f"- {r['set']} seed {r['seed']} {r['variant']}: {r.get('skipped') or r.get('error')}" for r in not_run]
        parts.append("## Not run\n\n" + "\n".join(lines))
    if report["validity"]:
        header = ["set", "who", "splits", "answered", "certified", "above target", "share", "p(share > δ)"]
        header += ["est. share, true risk > target"]
        cells = []
        for v in report["validity"]:
            for who in ("ensemble", "baseline"):
                if who in v:
                    e = v[who]
                    cells.append([v["set"], who, e["splits"], e["answered_splits"], e["certified"], e["exceeded"]])
                    cells[-1] += [e["share_exceeded"], e["p_share_above_delta"], e["est_share_true_risk_above"]]
                    cells[-1] += [e["coverage"], e["selective_error"]]
        parts.append(
            f"## Validity over {report['config']['validity']} splits per set (default variant)\n\n"
            f"A split counts as above target when its realized selective error on test.csv exceeds "
            f"{risk['target']:g}; the guarantee allows about a δ = {risk['delta']:g} share (the test error is "
            "itself an estimate, so a split near the target can land above it by chance; the estimated share of "
            "splits whose true risk is above the target averages each split's posterior chance of that).\n\n"
            + table([*header, "mean coverage", "mean sel. error"], cells)
        )
    return "\n\n".join(parts) + "\n"


def git_state() -> tuple[str, bool]:
    """The checkout's commit and whether tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return git("rev-parse", "HEAD") or "unknown", bool(git("status", "--porcelain", "--untracked-files=no"))


def main(argv: list[str] | None = None) -> int:
    """Plan, run, summarize, write."""
    args = parse_args(argv)
    sets = data_sets(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="flockwatch-quality-"))
    started, load = time.perf_counter(), os.getloadavg()
    jobs, skipped = plan(args, sets, work)
    print(f"{len(jobs)} jobs, {args.jobs} at once, in {work}", flush=True)
    rows = rows_of(execute(jobs, args.jobs), skipped)
    conformal = yaml.safe_load(args.conformal.read_text())
    commit, dirty = git_state()
    report = {
        "benchmark": "quality",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
        | {"load_avg_start": load, "load_avg_end": os.getloadavg()},
        "jobs": args.jobs,
        "config": {
            "sets": {name: str(path) for name, path in sets.items()},
            "seeds": args.seeds,
            "variants": args.variants,
            "validity": args.validity,
            "conformal": conformal,
            "conformal_file": str(args.conformal),
            "train_flags": args.train_flags,
            "baseline_cert": not args.no_baseline_cert,
        },
        "summary": summarize(rows, args.seeds),
        "validity": validity(rows, args.validity, conformal["risk"]) if args.validity else [],
        "rows": rows,
        "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text + f"\nwrote {args.out} and {args.out.with_suffix('.md')} in {report['wall_s'] / 60:.1f} min")
    if args.keep:
        print(f"work folder kept: {work}")
    elif not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
