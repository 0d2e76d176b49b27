"""Snorkel's `LabelModel.predict_proba`, replayed without its per-call set-up.

On every call snorkel rebuilds, for each labeling function, the set of clique-tree nodes that contain it (a
networkx walk: ~400 node look-ups per call for this project's LF sets) and takes the log of its parameters
again; for one text that was most of the ws voter's time (0.36 ms of which ~0.25 ms set-up). The posterior
itself is the same expression on the same arrays, so the result is bit-identical (tested against snorkel).
Only the independent-LF model that `LabelModel.fit` builds without dependencies is replayed; anything else
(another shape, a refit model) goes to snorkel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:  # snorkel imports torch (seconds): the model given is loaded already
    from snorkel.labeling.model import LabelModel


class Posterior:
    """P(Y | λ) of a fitted `LabelModel`, computed as its `predict_proba` computes it."""

    def __init__(self, model: LabelModel) -> None:
        self.source = model
        self.k = int(model.cardinality)
        self.m = int(model.m)
        self.log_mu = np.log(model.mu.cpu().detach().numpy())
        self.log_p = np.log(model.p)
        self.jtm = np.diag(np.ones(self.m * self.k))

    def fits(self, model: LabelModel, L: NDArray[np.int64]) -> bool:
        """Whether this replays `model` on `L` (same model object, L of its width, independent LFs)."""
        return (
            model is self.source
            and L.ndim == 2
            and L.shape[1] == self.m >= 3
            and self.log_mu.shape == (self.m * self.k, self.k)
            and model.c_tree.number_of_edges() == 0
        )

    def predict_proba(self, L: NDArray[np.int64]) -> NDArray[np.float64]:
        """(n, k) probabilities; L holds -1 (abstain) or a class index per LF."""
        shifted = L + 1
        ind = np.zeros((shifted.shape[0], self.m * self.k))
        for y in range(1, self.k + 1):
            ind[:, (y - 1) :: self.k] = np.where(shifted == y, 1, 0)
        X = np.exp(ind @ self.jtm @ self.log_mu + self.log_p)
        Z = np.tile(X.sum(axis=1).reshape(-1, 1), self.k)
        result: NDArray[np.float64] = X / Z
        return result
