"""Consensus fast path or the stacker, on (n, m, k) arrays (texts × voters × classes).

The service (a batch of ready texts) and the calibration of the policy (a whole split) run the same
code, so the thresholds are chosen on exactly the probabilities the service will produce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flockwatch.arbiter.stacker import Array, Mask, Stacker
from numpy.typing import NDArray

NO_VOTES, CONSENSUS, COMBINER = 0, 1, 2
PATHS = ("no_votes", "consensus", "combiner")  # Decision.path, indexed by the codes above


@dataclass(frozen=True)
class Combined:
    """Combined (n, k) probabilities (NaN rows where no voter gave an opinion) and each row's path."""

    probabilities: Array
    path: NDArray[np.int8]


def consensus_mask(probs: Array, present: Mask, min_prob: float) -> Mask:
    """Rows where ≥ 2 voters are present, all share the top class, each at ≥ `min_prob`."""
    k = probs.shape[2]
    top = probs.argmax(axis=2)
    same = np.where(present, top, k).min(axis=1) == np.where(present, top, -1).max(axis=1)
    sure = (~present | (probs.max(axis=2) >= min_prob)).all(axis=1)
    return np.asarray((present.sum(axis=1) >= 2) & same & sure)


def combine(stacker: Stacker, probs: Array, present: Mask, consensus_min_prob: float | None) -> Combined:
    """Consensus where the voters agree confidently (None: never), the stacker elsewhere, NaN with no votes.

    The consensus path skips the stacker on purpose: its probabilities are the mean of the agreeing
    voters' vectors, so its confidence is their mean probability for the shared class.
    """
    n, _, k = probs.shape
    n_present = present.sum(axis=1)
    if consensus_min_prob is None:
        consensus = np.zeros(n, dtype=bool)
    else:
        consensus = consensus_mask(probs, present, consensus_min_prob)
    pooled = ~consensus & (n_present > 0)
    if pooled.all():  # the usual case for one text: skip the masked copies
        return Combined(stacker.predict_proba_stacked(probs, present), np.full(n, COMBINER, dtype=np.int8))
    out = np.full((n, k), np.nan)
    if consensus.any():  # absent voters' rows are zeros, so the sum over voters is over the present ones
        out[consensus] = probs[consensus].sum(axis=1) / n_present[consensus, None]
    if pooled.any():
        out[pooled] = stacker.predict_proba_stacked(probs[pooled], present[pooled])
    path = np.where(consensus, CONSENSUS, np.where(pooled, COMBINER, NO_VOTES)).astype(np.int8)
    return Combined(out, path)
