import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flockwatch.classical_voter.app import ClassicalCore, load_core
from flockwatch.classical_voter.fastpath import FastCalibrated, FastFeatures, FastTfidf, transform_features
from flockwatch.classical_voter.model import ClassicalModel, normalized
from flockwatch.common.datasets import read_table
from flockwatch.common.datasets import split as split_by_hash
from scipy import sparse
from sklearn.calibration import CalibratedClassifierCV
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import MultinomialNB
from sklearn.pipeline import FeatureUnion
from sklearn.svm import LinearSVC

N_TRAIN, N_HELD_OUT = 700, 300
EDGE_TEXTS = ["", "zyxxy quorble", "!!!", "a" * 500]
# blank, only words no vocabulary holds, and non-ASCII (accents, CJK, an emoji)
ODD_TEXTS = [" ", "zyxxy quorble blorptang", "Grüße aus Köln — ça va? 東京で会おう 🙂", ""]


class TweakedLR(LogisticRegression):  # type: ignore[misc]  # sklearn is untyped
    """A subclass the fast path must not trust: it may change the decision function."""


class TweakedTfidf(TfidfVectorizer):  # type: ignore[misc]  # sklearn is untyped
    """A subclass the fast path must not trust: it may change the transform."""


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
    for name in ("_fast", "_fast_features"):
        assert name not in model.__getstate__()
        assert name in vars(model)
    assert pickle.loads(pickle.dumps(model))._fast_features is not None


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


# ---- the TF-IDF features: FastTfidf and FastFeatures against TfidfVectorizer and FeatureUnion


def assert_same_matrix(fast: Any, expected: Any) -> None:
    """Same kind, shape and dtypes, same stored entries in the same order, every value bit for bit."""
    assert type(fast) is type(expected) and fast.shape == expected.shape
    assert (fast.dtype, fast.indices.dtype, fast.indptr.dtype) == (
        expected.dtype,
        expected.indices.dtype,
        expected.indptr.dtype,
    )
    assert (fast != expected).nnz == 0
    np.testing.assert_array_equal(fast.indptr, expected.indptr)
    np.testing.assert_array_equal(fast.indices, expected.indices)
    assert fast.data.tobytes() == expected.data.tobytes()


def batches(texts: list[str]) -> Iterator[list[str]]:
    """Single texts (a real one and each odd one), then batches of 7 and 300 with the odd texts inside."""
    for text in [texts[0], *ODD_TEXTS]:
        yield [text]
    yield texts[1:3] + ODD_TEXTS + texts[3:4]
    yield texts[4:150] + ODD_TEXTS + texts[150:300]


@pytest.fixture(scope="module")
def bundle_model(sms_bundle: Path) -> ClassicalModel:
    """The classical model of a bundle trained by the real pipeline, loaded as the service loads it."""
    core = load_core(sms_bundle)
    assert core is not None
    return core.model


@pytest.fixture(scope="module")
def sms_test_texts(data_files: dict[str, Path]) -> list[str]:
    return split_by_hash(read_table(data_files["sms"], "text", "label"))["test"].texts


@pytest.fixture(scope="module")
def small_corpus(data_files: dict[str, Path]) -> tuple[list[str], list[str]]:
    """200 SMS texts (plus one with accents) to fit small vectorizers on, and 300 others to transform."""
    texts = read_table(data_files["sms"], "text", "label").texts
    return texts[:200] + ["Grüße aus Köln, ça va"], texts[200:500]


def test_bundle_features_are_bit_identical_to_sklearn(bundle_model: ClassicalModel, sms_test_texts: list[str]) -> None:
    features = bundle_model.features_
    fast = bundle_model._fast_features
    assert isinstance(fast, FastFeatures) and fast.serves(features)
    assert [type(part) for _, part in features.transformer_list] == [TfidfVectorizer, TfidfVectorizer]
    for batch in batches(sms_test_texts):
        assert_same_matrix(fast.transform(batch), features.transform(batch))
        for part, (_, vectorizer) in zip(fast.fast, features.transformer_list, strict=True):
            assert_same_matrix(part.transform(batch), vectorizer.transform(batch))


def test_bundle_predictions_are_unchanged(bundle_model: ClassicalModel, sms_test_texts: list[str]) -> None:
    texts = sms_test_texts[:300] + ODD_TEXTS
    with_fast = ClassicalCore(bundle_model, "test").predict(texts)
    without = pickle.loads(pickle.dumps(bundle_model))
    without._fast_features = None
    # exactly the numbers of the sklearn features, and those of the pure sklearn path up to FastCalibrated's 1e-12
    assert with_fast == ClassicalCore(without, "test").predict(texts)
    expected = sklearn_proba(bundle_model, texts)
    for voter, opinions in with_fast.items():
        probs = np.array([[o.probabilities[c] for c in bundle_model.classes_] for o in opinions])
        np.testing.assert_allclose(probs, expected[voter], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"sublinear_tf": True},
        {"norm": "l1"},
        {"norm": None, "sublinear_tf": True},
        {"use_idf": False},
        {"use_idf": False, "norm": None},
        {"smooth_idf": False},
        {"binary": True},
        {"binary": True, "norm": "l1", "sublinear_tf": True},
        {"ngram_range": (1, 2)},
        {"ngram_range": (1, 2), "sublinear_tf": True, "norm": "l1", "min_df": 2},
        {"analyzer": "char_wb", "ngram_range": (2, 5), "sublinear_tf": True},
        {"analyzer": "char_wb", "ngram_range": (1, 3), "norm": None, "use_idf": False},
        {"analyzer": "char", "ngram_range": (1, 3), "lowercase": False},
        {"stop_words": "english", "strip_accents": "unicode"},
        {"max_features": 300},
        {"dtype": np.float32},
        {"dtype": np.float32, "sublinear_tf": True, "norm": "l1", "analyzer": "char_wb"},
        {"analyzer": str.split},
    ],
    ids=lambda params: ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in params.items()) or "defaults",
)
def test_fast_tfidf_is_bit_identical_to_sklearn(
    params: dict[str, Any], small_corpus: tuple[list[str], list[str]]
) -> None:
    train, held_out = small_corpus
    vectorizer = TfidfVectorizer(**params).fit(train)
    fast = FastTfidf.compile(vectorizer)
    assert fast is not None and fast.serves(vectorizer)
    for batch in batches(held_out):
        assert_same_matrix(fast.transform(batch), vectorizer.transform(batch))
    assert fast.transform([]).shape == (0, fast.width)  # where sklearn refuses an empty batch


def test_fast_features_put_the_parts_side_by_side_as_the_union(small_corpus: tuple[list[str], list[str]]) -> None:
    train, held_out = small_corpus
    union = FeatureUnion(
        [
            ("words", TfidfVectorizer(ngram_range=(1, 2), norm="l1")),
            ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True)),
            ("binary", TfidfVectorizer(binary=True, use_idf=False, stop_words="english")),
        ]
    ).fit(train)
    fast = FastFeatures.compile(union)
    assert fast is not None and fast.serves(union)
    for batch in batches(held_out):
        assert_same_matrix(fast.transform(batch), union.transform(batch))


def test_the_fitted_model_uses_the_fast_features(model: ClassicalModel, task: Split) -> None:
    fast = model._fast_features
    assert fast is not None and fast.serves(model.features_)
    assert_same_matrix(fast.transform(task[2]), model.features_.transform(task[2]))


def fitted(vectorizer: Any) -> Any:
    return vectorizer.fit(["one text", "another text", "a third one"])


@pytest.mark.parametrize(
    "vectorizer",
    [
        fitted(TweakedTfidf()),
        TfidfVectorizer(),  # not fitted
        TfidfVectorizer(vocabulary=["one", "text"]),  # not fitted: no idf
        fitted(TfidfVectorizer()).set_params(dtype=np.int64),  # sklearn counts in int64, then converts
        fitted(CountVectorizer()),
        fitted(FeatureUnion([("words", TfidfVectorizer())])),
    ],
    ids=["subclass", "unfitted", "vocabulary-only", "int64", "counts", "union"],
)
def test_unknown_vectorizers_have_no_fast_path(vectorizer: Any) -> None:
    assert FastTfidf.compile(vectorizer) is None


@pytest.mark.parametrize(
    "union",
    [
        FeatureUnion([("words", fitted(TfidfVectorizer()))], transformer_weights={"words": 2.0}),
        FeatureUnion([("words", fitted(TfidfVectorizer())), ("counts", fitted(CountVectorizer()))]),
        FeatureUnion([("words", fitted(TfidfVectorizer())), ("sub", fitted(TweakedTfidf()))]),
        FeatureUnion([("words", fitted(TfidfVectorizer())), ("dropped", "drop")]),
        FeatureUnion([("words", fitted(TfidfVectorizer())), ("f32", fitted(TfidfVectorizer(dtype=np.float32)))]),
        fitted(TfidfVectorizer()),
    ],
    ids=["weighted", "counts", "subclass", "drop", "mixed-dtypes", "not-a-union"],
)
def test_unknown_unions_have_no_fast_path(union: Any) -> None:
    assert FastFeatures.compile(union) is None


def test_refitted_or_reconfigured_vectorizer_is_not_served(small_corpus: tuple[list[str], list[str]]) -> None:
    train, _ = small_corpus
    vectorizer = TfidfVectorizer().fit(train)
    fast = FastTfidf.compile(vectorizer)
    assert fast is not None and fast.serves(vectorizer)
    assert not fast.serves(TfidfVectorizer().fit(train))
    vectorizer.set_params(lowercase=False)
    assert not fast.serves(vectorizer)
    vectorizer.set_params(lowercase=True)
    assert fast.serves(vectorizer)
    vectorizer.fit(train)
    assert not fast.serves(vectorizer)


@pytest.mark.parametrize(
    "change",
    [
        lambda features: features.set_params(word__lowercase=False),
        lambda features: features.set_params(transformer_weights={"word": 2.0, "char": 1.0}),
        lambda features: features.transformer_list.reverse(),
    ],
    ids=["vectorizer-parameter", "weights", "order"],
)
def test_changed_features_are_transformed_by_sklearn(model: ClassicalModel, task: Split, change: Any) -> None:
    held_out = task[2]
    copy = pickle.loads(pickle.dumps(model))
    change(copy.features_)  # the widths stay, so the fitted models still apply
    assert copy._fast_features is not None and not copy._fast_features.serves(copy.features_)
    expected = sklearn_proba(copy, held_out)
    original = model.predict_proba_all(held_out)
    for voter, probs in copy.predict_proba_all(held_out).items():
        assert not np.allclose(expected[voter], original[voter])  # a stale fast path would give these
        np.testing.assert_allclose(probs, expected[voter], rtol=0, atol=1e-12)
