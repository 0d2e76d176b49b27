"""A run's data: the base data set with the clean corrections applied, the gate's held-out texts, and the
recalibration pool.

Corrections come from the feedback service PII-scrubbed, so they are matched to base texts by the
normalized *scrubbed* text: a correction relabels the base text it was made on (which keeps its place in
the fixed hash split), and a correction of a text the base data lacks adds it. The gate's held-out texts are
the test split of the merged data minus any text whose scrubbed form also sits in train or calibration (a
scrubbed copy can hash to another split), so the challenger is never judged on what it trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flockwatch.common.datasets import Dataset, deduplicate, normalize, split
from flockwatch.feedback.pii import scrub
from numpy.typing import NDArray

Key = Callable[[str], str]


def scrub_key(text: str) -> str:
    """The matching key of a text: normalized after PII scrubbing (as the feedback service stores it)."""
    return normalize(scrub(text).text)


@dataclass(frozen=True)
class RunData:
    """The merged training data; which texts carry a corrected label; counts for the run record."""

    data: Dataset
    corrected: frozenset[str]  # normalized texts whose label comes from a correction
    keys: dict[str, str] = field(repr=False)  # text → scrub key
    report: dict[str, int] = field(default_factory=dict)

    def key(self, text: str) -> str:
        """The scrub key of one of the run's texts (cached)."""
        if text not in self.keys:
            self.keys[text] = scrub_key(text)
        return self.keys[text]


def merge(base: Dataset, corrections: Sequence[tuple[str, str]], key: Key = scrub_key) -> RunData:
    """Apply corrections to the base data: a corrected text's label replaces the base label; new texts are added."""
    keys = {t: key(t) for t in base.texts}
    by_key: dict[str, list[int]] = {}
    for i, t in enumerate(base.texts):
        by_key.setdefault(keys[t], []).append(i)
    texts, labels = list(base.texts), list(base.labels)
    corrected: set[str] = set()
    counts = {"base": len(base), "corrections": len(corrections), "relabelled": 0, "confirmed": 0, "added": 0}
    for text, label in corrections:
        k = key(text)
        matches = by_key.get(k)
        if matches:
            for i in matches:
                counts["relabelled" if labels[i] != label else "confirmed"] += 1
                labels[i] = label
                corrected.add(normalize(texts[i]))
            continue
        texts.append(text)
        labels.append(label)
        keys[text] = k
        by_key[k] = [len(texts) - 1]
        corrected.add(normalize(text))
        counts["added"] += 1
    data = deduplicate(texts, labels)
    counts["rows"] = len(data)
    return RunData(data, frozenset(corrected), keys, counts)


@dataclass(frozen=True)
class HeldOutSet:
    """The gate's held-out texts and, per text, whether its label is curated (from the base data)."""

    data: Dataset
    reference: NDArray[np.bool_]
    dropped_leaks: int


def held_out(run: RunData) -> HeldOutSet:
    """The test split of the merged data, without texts whose scrubbed form is also in train or calibration."""
    parts = split(run.data)
    fitted = {run.key(t) for s in ("train", "calibration") for t in parts[s].texts}
    test = parts["test"]
    keep = [i for i, t in enumerate(test.texts) if run.key(t) not in fitted]
    data = Dataset([test.texts[i] for i in keep], [test.labels[i] for i in keep])
    reference = np.array([normalize(t) not in run.corrected for t in data.texts], dtype=bool)
    return HeldOutSet(data, reference, len(test) - len(keep))


def training_rows(run: RunData) -> Dataset:
    """Every text outside the gate's held-out (test) split: what a full run trains and calibrates on."""
    parts = split(run.data)
    kept = [parts[s] for s in ("train", "calibration")]
    return Dataset([t for d in kept for t in d.texts], [y for d in kept for y in d.labels])


def _second_half(text: str) -> bool:
    """A second, independent hash split of a pool into halves."""
    return hashlib.sha256(b"recalibrate\x1f" + normalize(text).encode()).digest()[0] % 2 == 1


MIN_RECALIBRATION_POOL = 40  # fewer texts cannot fit a stacker and conformal thresholds worth gating


def recalibration_pool(
    run: RunData, recent: Sequence[tuple[str, str]], calibration_held_out: bool = True
) -> tuple[Dataset, Dataset]:
    """(stacker rows, conformal rows) for a calibration-only run with the voters frozen.

    The frozen voters must never have trained on these texts: corrections newer than their bundle
    (`recent`) and, when the champion was calibrated on a held-out share (`calibration_held_out`: trained
    with `--calibration holdout` at the split's shares), the calibration split. A cross-fitted champion's
    voters trained on every non-test text, so only the recent corrections qualify. The test split stays
    held out for the gate. The pool is halved by a second hash.
    """
    parts = split(run.data)
    recent_keys = {scrub_key(t) for t, _ in recent}
    pool_texts, pool_labels = [], []
    if calibration_held_out:
        pool_texts, pool_labels = list(parts["calibration"].texts), list(parts["calibration"].labels)
    for s in ("train",) if calibration_held_out else ("train", "calibration"):
        for t, y in zip(parts[s].texts, parts[s].labels, strict=True):
            if run.key(t) in recent_keys:
                pool_texts.append(t)
                pool_labels.append(y)
    if len(pool_texts) < MIN_RECALIBRATION_POOL:
        raise ValueError(
            f"a calibration-only run needs at least {MIN_RECALIBRATION_POOL} texts the champion's voters never "
            f"trained on, and has {len(pool_texts)} (corrections newer than the champion"
            f"{'' if calibration_held_out else '; it was cross-fitted, so its calibration texts are trained on'})"
        )
    halves: dict[bool, tuple[list[str], list[str]]] = {False: ([], []), True: ([], [])}
    for t, y in zip(pool_texts, pool_labels, strict=True):
        texts, labels = halves[_second_half(t)]
        texts.append(t)
        labels.append(y)
    return Dataset(*halves[False]), Dataset(*halves[True])
