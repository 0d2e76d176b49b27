"""The weak-supervision voter's pure core: LFs → label matrix → Snorkel label model (or majority vote)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from flockwatch.common.labels import LabelConfig
from flockwatch.common.metrics import classification_report
from flockwatch.common.service import VoterCore
from flockwatch.common.voting import Opinion, opinions_matrix
from flockwatch.ws_voter.fastpath import Posterior
from flockwatch.ws_voter.lfs import LFSet
from numpy.typing import NDArray

if TYPE_CHECKING:  # snorkel imports torch (seconds): only when a label model is fitted
    from snorkel.labeling.model import LabelModel

VOTER = "ws"
ABSTAIN = -1
LABEL_MODEL, MAJORITY = "label_model", "majority"
# Macro-F1 differences smaller than this are noise on a few thousand texts; then the lower Brier score (a proper
# score: accuracy and calibration together) decides.
TIE = 0.01
Outputs = Mapping[str, NDArray[np.floating[Any]]]


class MissingVoterOutputs(ValueError):
    """A voter LF needs the outputs of a voter that were not given (or have the wrong shape)."""


def agreement_accuracy(L: NDArray[np.int64], k: int) -> float:
    """One accuracy shared by all LFs, from how often two LFs that fire on a text agree (no labels needed).

    Two independent LFs of accuracy a whose errors spread evenly agree with probability
    a² + (1 - a)² / (k - 1); solved for a. Correlated LFs agree more, so this leans optimistic.
    """
    fired = L != ABSTAIN
    agree = total = 0
    for i in range(L.shape[1]):
        for j in range(i + 1, L.shape[1]):
            both = fired[:, i] & fired[:, j]
            total += int(both.sum())
            agree += int((L[both, i] == L[both, j]).sum())
    rate = agree / total if total else 1.0 / k
    a = (1 + np.sqrt(max(1 - k + rate * k * (k - 1), 0.0))) / k
    return float(np.clip(a, 1.0 / k + 1e-3, 0.999))


def majority_proba(L: NDArray[np.int64], k: int, accuracy: float) -> NDArray[np.float64]:
    """Majority vote as probabilities: every LF counts the same, `accuracy` sets how sure a vote is."""
    counts = np.stack([np.equal(L, c).sum(axis=1) for c in range(k)], axis=1).astype(np.float64)
    logits = counts * np.log(accuracy * (k - 1) / (1 - accuracy))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    normalized: NDArray[np.float64] = p / p.sum(axis=1, keepdims=True)
    return normalized


def lf_summary(L: NDArray[np.int64], y: NDArray[np.int64] | None = None) -> list[dict[str, float | int | None]]:
    """Per LF, as Snorkel's LFAnalysis defines them: coverage, overlaps, conflicts, and empirical accuracy."""
    fired = L != ABSTAIN
    n = max(len(L), 1)
    overlapped = fired.sum(axis=1) > 1
    top = np.where(fired, L, -1).max(axis=1, keepdims=True)
    conflicted = (fired & np.not_equal(L, top)).any(axis=1)
    rows: list[dict[str, float | int | None]] = []
    for j in range(L.shape[1]):
        col = fired[:, j]
        row: dict[str, float | int | None] = {
            "coverage": float(col.sum() / n),
            "overlaps": float((col & overlapped).sum() / n),
            "conflicts": float((col & conflicted).sum() / n),
        }
        if y is not None:
            correct = int((L[col, j] == y[col]).sum())
            row.update(correct=correct, incorrect=int(col.sum()) - correct)
            row["accuracy"] = correct / int(col.sum()) if col.any() else None
        rows.append(row)
    return rows


def label_model_state(model: LabelModel) -> dict[str, Any]:
    """What a fitted independent-LF `LabelModel` predicts from: its cardinality, LF count, μ and class prior."""
    if model.c_tree.number_of_edges():
        raise ValueError("only label models without LF dependencies are saved (fit builds no others)")
    return {
        "cardinality": int(model.cardinality),
        "m": int(model.m),
        "mu": model.mu.detach().cpu().numpy(),  # float32, as fitted
        "p": np.asarray(model.p, dtype=np.float64),
    }


def label_model_from(state: Mapping[str, Any]) -> LabelModel:
    """A snorkel `LabelModel` that predicts as the one `label_model_state` was taken from (bit-identical: it is
    the same model with the same arrays; `fit` left nothing else that `predict_proba` reads)."""
    import torch
    from snorkel.labeling.model import LabelModel

    model = LabelModel(cardinality=int(state["cardinality"]), verbose=False)
    model.m = int(state["m"])
    model.p = np.asarray(state["p"], dtype=np.float64)
    model.mu = torch.nn.Parameter(torch.from_numpy(np.array(state["mu"])))
    model._create_tree()  # noqa: SLF001 - snorkel's own set-up of the clique tree for independent LFs
    return model


class WSModel(VoterCore):
    """Labeling functions combined by a Snorkel LabelModel or by majority vote, whichever was better."""

    voters = (VOTER,)

    def __init__(self, classes: Sequence[str], lfs: LFSet, seed: int = 0) -> None:
        if list(classes) != list(lfs.classes):
            raise ValueError(f"the LF set was built for classes {list(lfs.classes)}, not {list(classes)}")
        self.classes, self.lfs, self.seed = list(classes), lfs, seed
        self.version = f"ws-{lfs.version}"
        self.sources_: list[VoterCore] = []
        self.label_model_: LabelModel | None = None
        self._lock = threading.Lock()  # snorkel's predict_proba keeps the batch size on the model

    @classmethod
    def fit(
        cls,
        texts: list[str],
        labels: LabelConfig,
        lfs: LFSet,
        voter_outputs: Outputs | None = None,
        y: Sequence[str] | None = None,
        seed: int = 0,
    ) -> WSModel:
        """Fit the label model on unlabeled `texts`; `y` (optional) only chooses label model vs majority."""
        if not texts:
            raise ValueError("no texts to fit the label model on")
        if y is not None and len(y) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(y)} labels")
        model = cls(labels.names, lfs, seed)
        L = model.label_matrix(texts, voter_outputs)
        model.mv_accuracy_ = agreement_accuracy(L, len(model.classes))
        model.label_model_ = model._fit_label_model(L)
        model.method_, model.report_ = model._choose(L, y)
        return model

    def label_matrix(self, texts: Sequence[str], voter_outputs: Outputs | None = None) -> NDArray[np.int64]:
        """(n, n_lfs) class indices, -1 where an LF abstains."""
        index = {c: i for i, c in enumerate(self.classes)}
        L = np.full((len(texts), len(self.lfs.ids)), ABSTAIN, dtype=np.int64)
        for j, lf in enumerate(self.lfs.patterns):
            L[[i for i, text in enumerate(texts) if lf.fires(text)], j] = index[lf.label]
        offset = len(self.lfs.patterns)
        for j, vlf in enumerate(self.lfs.voters):
            probs = (voter_outputs or {}).get(vlf.voter)
            if probs is None or np.shape(probs) != (len(texts), len(self.classes)):
                got = "nothing" if probs is None else f"shape {np.shape(probs)}"
                raise MissingVoterOutputs(
                    f"LF {vlf.id} needs {vlf.voter}'s probabilities of shape ({len(texts)}, {len(self.classes)});"
                    f" got {got}"
                )
            p = np.asarray(probs, dtype=np.float64)
            answered = np.asarray(np.isfinite(p).all(axis=1), dtype=bool)
            top = np.where(answered[:, None], p, -np.inf).max(axis=1)
            confident = answered & (top >= vlf.min_prob)
            L[confident, offset + j] = np.nan_to_num(p[confident], nan=-1.0).argmax(axis=1)
        return L

    def proba(self, L: NDArray[np.int64], method: str | None = None) -> NDArray[np.float64]:
        """(n, k) probabilities from the chosen (or named) method; NaN rows where too few LFs fire."""
        method = method or self.method_
        k = len(self.classes)
        if method == LABEL_MODEL and self.label_model_ is not None:
            fast = self._posterior()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy divide warnings on rows no LF covers
                if fast is not None and fast.fits(self.label_model_, L):
                    p = fast.predict_proba(L)
                else:
                    with self._lock:
                        p = np.asarray(self.label_model_.predict_proba(L), dtype=np.float64)
        else:
            p = majority_proba(L, k, self.mv_accuracy_)
        bad = ~np.isfinite(p).all(axis=1)
        p[bad] = majority_proba(L[bad], k, self.mv_accuracy_)
        p = np.clip(p, 1e-6, 1.0)
        p /= p.sum(axis=1, keepdims=True)
        p[(L != ABSTAIN).sum(axis=1) < self.lfs.min_lfs] = np.nan
        return p

    def _posterior(self) -> Posterior | None:
        """The label model's posterior without snorkel's per-call set-up (see `fastpath`), built once."""
        lm = self.label_model_
        fast = getattr(self, "_fast", None)
        if lm is not None and (fast is None or fast.source is not lm):
            try:
                fast = self._fast = Posterior(lm)
            except (AttributeError, ValueError):  # not a model this replays: snorkel answers
                return None
        return fast

    def predict_with(self, texts: Sequence[str], voter_outputs: Outputs | None) -> dict[str, list[Opinion]]:
        """One opinion per text, given the outputs of the voters that voter LFs read."""
        L = self.label_matrix(texts, voter_outputs)
        probs = self.proba(L)
        ids = self.lfs.ids
        opinions = []
        for row, p in zip(L, probs, strict=True):
            evidence = tuple(ids[j] for j in np.flatnonzero(row != ABSTAIN))
            if np.isnan(p).any():
                reason = f"{len(evidence)} labeling function(s) fired; at least {self.lfs.min_lfs} needed"
                opinions.append(Opinion(None, reason, evidence=evidence))
            else:
                opinions.append(Opinion(dict(zip(self.classes, map(float, p), strict=True)), evidence=evidence))
        return {VOTER: opinions}

    def predict(self, texts: Sequence[str]) -> dict[str, list[Opinion]]:
        """One opinion per text; voter LFs read the attached voter cores (see `attach`)."""
        return self.predict_with(texts, self.voter_outputs(texts))

    def attach(self, sources: Sequence[VoterCore]) -> None:
        """The voter cores whose outputs the voter LFs read at predict time (not pickled)."""
        self.sources_ = list(sources)

    def voter_outputs(self, texts: Sequence[str]) -> dict[str, NDArray[np.float64]] | None:
        """The needed voters' probabilities on `texts`, from the attached cores."""
        needed = self.lfs.needed_voters
        if not needed:
            return None
        out: dict[str, NDArray[np.float64]] = {}
        for core in self.sources_:
            if set(core.voters) & set(needed):
                for voter, column in core.predict(texts).items():
                    if voter in needed:
                        out[voter] = opinions_matrix(column, self.classes)
        return out

    def __getstate__(self) -> dict[str, Any]:
        """Plain state (what skops can write): the label model as its fitted arrays, not a torch module."""
        state = dict(self.__dict__)
        state["sources_"] = []  # other voters' cores belong to their own artifacts
        del state["_lock"]
        state.pop("_fast", None)  # rebuilt from the label model when first needed
        lm = state.pop("label_model_")
        state["label_model_state_"] = None if lm is None else label_model_state(lm)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        fitted = state.pop("label_model_state_")
        self.__dict__.update(state)
        self.label_model_ = None if fitted is None else label_model_from(fitted)
        self._lock = threading.Lock()

    def _fit_label_model(self, L: NDArray[np.int64]) -> LabelModel | None:
        spec, k = self.lfs.label_model, len(self.classes)
        self.class_balance_ = None
        if spec.class_balance == "majority":
            # the class shares majority vote finds on the covered texts (add-one smoothed): no labels used
            votes = majority_proba(L, k, self.mv_accuracy_)[(L != ABSTAIN).any(axis=1)].argmax(axis=1)
            shares = np.bincount(votes, minlength=k) + 1.0
            self.class_balance_ = (shares / shares.sum()).tolist()
        from snorkel.labeling.model import LabelModel

        model = LabelModel(cardinality=k, verbose=False)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scipy/numpy warnings inside snorkel's LF statistics
                model.fit(
                    L_train=L,
                    class_balance=self.class_balance_,
                    n_epochs=spec.n_epochs,
                    lr=spec.lr,
                    l2=spec.l2,
                    seed=self.seed,
                    progress_bar=False,
                )
        except Exception as exc:  # noqa: BLE001 - snorkel raises bare Exception (e.g. "Loss is NaN")
            self.label_model_error_ = f"{type(exc).__name__}: {exc}"
            return None
        return model

    def _choose(self, L: NDArray[np.int64], y: Sequence[str] | None) -> tuple[str, dict[str, Any]]:
        """The method to use, and the comparison it rests on."""
        fired = (L != ABSTAIN).sum(axis=1)
        report: dict[str, Any] = {
            "n_train": len(L),
            "n_lfs": L.shape[1],
            "min_lfs": self.lfs.min_lfs,
            "coverage": float((fired >= self.lfs.min_lfs).mean()),
            "majority_accuracy_estimate": self.mv_accuracy_,
            "class_balance": self.class_balance_,
        }
        if self.label_model_ is None:
            report["label_model_error"] = self.label_model_error_
        compare = {m: self.proba(L, m) for m in (LABEL_MODEL, MAJORITY)} if y is not None else {}
        for m, p in compare.items():
            r = classification_report(list(y or []), p, self.classes)
            report[m] = {key: r[key] for key in ("macro_f1", "accuracy", "ece", "brier", "coverage")}
        if self.label_model_ is None:
            return MAJORITY, {**report, "chosen": MAJORITY, "reason": "the label model failed to fit"}
        if self.lfs.choice != "auto":
            return self.lfs.choice, {**report, "chosen": self.lfs.choice, "reason": "given in lfs.yaml"}
        if not compare:
            return LABEL_MODEL, {**report, "chosen": LABEL_MODEL, "reason": "no labels to compare with"}
        lm, mv = report[LABEL_MODEL], report[MAJORITY]
        f1_lm, f1_mv = lm["macro_f1"] or 0.0, mv["macro_f1"] or 0.0
        if abs(f1_lm - f1_mv) >= TIE:
            chosen, reason = (LABEL_MODEL, MAJORITY)[f1_mv > f1_lm], "higher macro-F1 on the labeled fit texts"
        else:
            chosen = MAJORITY if (mv["brier"] or 2.0) < (lm["brier"] or 2.0) else LABEL_MODEL
            reason = f"macro-F1 within {TIE}; lower Brier score on the labeled fit texts"
        return chosen, {**report, "chosen": chosen, "reason": reason}
