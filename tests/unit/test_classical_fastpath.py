import pickle
from pathlib import Path

import numpy as np
import pytest
from flockwatch.classical_voter.fastpath import FastCalibrated, transform_features
from flockwatch.classical_voter.model import ClassicalModel, normalized
from flockwatch.common.datasets import read_table
from scipy import sparse
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import MultinomialNB
from sklearn.pipeline import FeatureUnion
from sklearn.svm import LinearSVC

N_TRAIN, N_HELD_OUT = 700, 300
EDGE_TEXTS = ["", "zyxxy quorble", "!!!", "a" * 500]


class TweakedLR(LogisticRegression):  # type: ignore[misc]  # sklearn is untyped
    """A subclass the fast path must not trust: it may change the decision function."""


Split = tuple[list[str], list[str], list[str]]


def split(path: Path) -> Split:
    """Training texts and labels, and held-out texts (plus edge cases), from the head of a bundled file."""
    data = read_table(path, "text", "label")
    order = np.random.default_rng(0).permutation(len(data.texts))
    texts, labels = [data.texts[i] for i in order], [data.labels[i] for i in order]
    return texts[:N_TRAIN], labels[:N_TRAIN], texts[N_TRAIN : N_TRAIN + N_HELD_OUT] + EDGE_TEXTS


@pytest.fixture(scope="module", params=["sms", "trec"])
def task(request: pytest.FixtureRequest, data_files: dict[str, Path]) -> Split:
    return split(data_files[request.param])


@pytest.fixture(scope="module", params=["sigmoid", "isotonic"])
def model(request: pytest.FixtureRequest, task: Split) -> ClassicalModel:
    texts, labels, _ = task
    return ClassicalModel(calibration=request.param).fit(texts, labels)


def sklearn_proba(model: ClassicalModel, texts: list[str]) -> dict[str, np.ndarray]:
    """The path without the fast path: FeatureUnion.transform and CalibratedClassifierCV.predict_proba."""
    x = model.features_.transform(texts)
    return {v: normalized(model.models_[v].predict_proba(x)) for v in model.voters_}


def test_fast_path_equals_sklearn_for_every_voter(model: ClassicalModel, task: Split) -> None:
    x = model.features_.transform(task[2])
    for calibrated in model.models_.values():
        fast = FastCalibrated.compile(calibrated)
        assert fast is not None
        np.testing.assert_allclose(fast.predict_proba(x), calibrated.predict_proba(x), rtol=0, atol=1e-12)


def test_fast_path_equals_sklearn_on_extreme_scores(model: ClassicalModel) -> None:
    # rows far outside the training range exercise the isotonic clipping and sklearn's edge cases
    rng = np.random.default_rng(1)
    n_features = model.features_.transform([""]).shape[1]
    x = sparse.random(50, n_features, density=0.01, format="csr", rng=rng, data_rvs=rng.standard_normal)
    x = sparse.diags(rng.choice([1e-3, 1.0, 1e2, 1e4], 50)) @ x
    for calibrated in model.models_.values():
        fast = FastCalibrated.compile(calibrated)
        assert fast is not None
        np.testing.assert_allclose(fast.predict_proba(x), calibrated.predict_proba(x), rtol=0, atol=1e-12)


def test_predict_proba_all_equals_the_sklearn_path(model: ClassicalModel, task: Split) -> None:
    for batch in (task[2][:1], task[2][:10], task[2]):
        expected = sklearn_proba(model, batch)
        for voter, probs in model.predict_proba_all(batch).items():
            np.testing.assert_allclose(probs, expected[voter], rtol=0, atol=1e-12)


def test_direct_feature_transform_is_identical_to_the_union(model: ClassicalModel, task: Split) -> None:
    union, direct = model.features_.transform(task[2]), transform_features(model.features_, task[2])
    assert (union != direct).nnz == 0 and union.shape == direct.shape


def test_weighted_union_goes_through_sklearn(model: ClassicalModel, task: Split) -> None:
    weighted = FeatureUnion(model.features_.transformer_list, transformer_weights={"word": 2.0, "char": 1.0})
    expected = model.features_.transform(task[2]).toarray()
    width = model.features_.transformer_list[0][1].transform([""]).shape[1]
    expected[:, :width] *= 2.0
    np.testing.assert_allclose(transform_features(weighted, task[2]).toarray(), expected)


@pytest.mark.parametrize(
    "calibrated",
    [
        CalibratedClassifierCV(LogisticRegression(), method="temperature", cv=3),
        CalibratedClassifierCV(TweakedLR(), method="sigmoid", cv=3),
        CalibratedClassifierCV(MultinomialNB(), method="isotonic", cv=3),
    ],
    ids=["temperature", "subclass", "naive-bayes"],
)
@pytest.mark.parametrize("n_classes", [2, 3])
def test_unknown_kinds_have_no_fast_path(calibrated: CalibratedClassifierCV, n_classes: int) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.random((60, 5)), np.arange(60) % n_classes
    assert FastCalibrated.compile(calibrated.fit(x + y[:, None], y)) is None


def test_unfitted_and_foreign_models_have_no_fast_path() -> None:
    assert FastCalibrated.compile(CalibratedClassifierCV(LogisticRegression())) is None
    assert FastCalibrated.compile(LogisticRegression()) is None


def test_swapped_in_unknown_model_is_scored_by_sklearn(model: ClassicalModel, task: Split) -> None:
    texts, labels, held_out = task
    swapped = pickle.loads(pickle.dumps(model))
    nb = CalibratedClassifierCV(MultinomialNB(), method="sigmoid", cv=3)
    swapped.models_["tfidf_svm"] = nb.fit(swapped.features_.transform(texts), labels)
    expected = normalized(nb.predict_proba(swapped.features_.transform(held_out)))
    # straight after the swap (a stale fast path would give the SVM's numbers) and after a reload
    for current in (swapped, pickle.loads(pickle.dumps(swapped))):
        probs = current.predict_proba_all(held_out)
        np.testing.assert_array_equal(probs["tfidf_svm"], expected)
        np.testing.assert_array_equal(probs["tfidf_lr"], model.predict_proba_all(held_out)["tfidf_lr"])


def test_pickle_leaves_out_the_fast_path(model: ClassicalModel) -> None:
    assert "_fast" not in model.__getstate__()
    assert "_fast" in vars(model)


@pytest.mark.parametrize("method", ["sigmoid", "isotonic"])
def test_rows_every_calibrator_calls_impossible_are_uniform_as_in_sklearn(method: str) -> None:
    # three clusters around the origin: at the origin every one-vs-rest score is negative, and the
    # calibrators below are set to map such scores to exactly 0
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    x = 10 * np.array([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])[y] + rng.normal(size=(120, 2))
    calibrated = CalibratedClassifierCV(LinearSVC(), method=method, cv=3).fit(x, y)
    for member in calibrated.calibrated_classifiers_:
        for c in member.calibrators:
            if method == "isotonic":
                c.fit([0.0, 1.0], [0.0, 1.0])
            else:
                c.a_, c.b_ = -1e4, 1e4  # expit(1e4 * (score - 1)) underflows to 0 below a score of 0.9
    rows = np.array([[0.0, 0.0], [10.0, 0.0], [0.5, 0.5]])
    fast = FastCalibrated.compile(calibrated)
    assert fast is not None
    expected = calibrated.predict_proba(rows)
    np.testing.assert_array_equal(expected[0], [1 / 3] * 3)
    np.testing.assert_allclose(fast.predict_proba(rows), expected, rtol=0, atol=1e-12)


def test_model_refitted_in_place_is_not_scored_with_stale_parameters(model: ClassicalModel, task: Split) -> None:
    texts, labels, held_out = task
    copy = pickle.loads(pickle.dumps(model))
    copy.models_["tfidf_lr"].fit(copy.features_.transform(texts[: N_TRAIN // 2]), labels[: N_TRAIN // 2])
    expected = sklearn_proba(copy, held_out)["tfidf_lr"]
    assert not np.allclose(expected, model.predict_proba_all(held_out)["tfidf_lr"])
    np.testing.assert_allclose(copy.predict_proba_all(held_out)["tfidf_lr"], expected, rtol=0, atol=1e-12)
