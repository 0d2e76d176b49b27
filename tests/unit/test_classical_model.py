import pickle
from pathlib import Path

import numpy as np
import pytest
from flockwatch.classical_voter.app import load_core, save
from flockwatch.classical_voter.model import ClassicalModel, TrainingDataError
from flockwatch.common.artifacts import Manifest, write_manifest
from sklearn.exceptions import NotFittedError

VOCAB = {
    "sport": ["goal", "match", "team", "score", "league", "coach", "referee", "striker"],
    "food": ["pasta", "recipe", "oven", "spicy", "dinner", "sauce", "bake", "salad"],
    "tech": ["laptop", "python", "server", "cloud", "keyboard", "chip", "code", "browser"],
}
SHARED = ["the", "a", "today", "really", "new", "my", "great", "about"]


def make_data(n_per_class: int, noise: float = 0.0, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    classes = sorted(VOCAB)
    texts, labels = [], []
    for label in classes:
        for _ in range(n_per_class):
            words = list(rng.choice(VOCAB[label], 3)) + list(rng.choice(SHARED, 3))
            rng.shuffle(words)
            texts.append(" ".join(words))
            flip = rng.uniform() < noise
            labels.append(str(rng.choice(classes)) if flip else label)
    return texts, labels


@pytest.fixture(scope="module")
def data() -> tuple[list[str], list[str]]:
    return make_data(30)


@pytest.fixture(scope="module")
def model(data: tuple[list[str], list[str]]) -> ClassicalModel:
    return ClassicalModel().fit(*data)


def test_fitted_attributes_name_voters_and_sorted_classes(model: ClassicalModel) -> None:
    assert model.voters_ == ["tfidf_lr", "tfidf_svm"]
    assert model.classes_ == ["food", "sport", "tech"]


def test_probabilities_sum_to_one_in_class_order(model: ClassicalModel) -> None:
    probs = model.predict_proba_all(["pasta sauce dinner", "goal by the striker"])
    for p in probs.values():
        assert p.shape == (2, 3)
        np.testing.assert_allclose(p.sum(axis=1), 1.0)
        assert list(p.argmax(axis=1)) == [0, 1]


def test_predict_gives_one_opinion_per_text_per_voter(model: ClassicalModel) -> None:
    opinions = model.predict(["python code on a server"])
    assert set(opinions) == {"tfidf_lr", "tfidf_svm"}
    for voter, [opinion] in opinions.items():
        assert opinion.probabilities is not None
        assert list(opinion.probabilities) == model.classes_
        assert sum(opinion.probabilities.values()) == pytest.approx(1.0)
        assert max(opinion.probabilities, key=opinion.probabilities.__getitem__) == "tech"
        assert opinion.evidence == (voter,)


def test_empty_batch_gives_empty_results(model: ClassicalModel) -> None:
    assert all(p.shape == (0, 3) for p in model.predict_proba_all([]).values())
    assert model.predict([]) == {"tfidf_lr": [], "tfidf_svm": []}


def test_unseen_words_and_empty_text_still_get_probabilities(model: ClassicalModel) -> None:
    for p in model.predict_proba_all(["zyxxy quorble", ""]).values():
        np.testing.assert_allclose(p.sum(axis=1), 1.0)


def test_pickle_roundtrip_keeps_probabilities(model: ClassicalModel) -> None:
    texts = ["bake a salad", "cloud chip", "the coach"]
    restored = pickle.loads(pickle.dumps(model))
    for voter, p in model.predict_proba_all(texts).items():
        np.testing.assert_array_equal(restored.predict_proba_all(texts)[voter], p)


@pytest.mark.parametrize("calibration", ["sigmoid", "isotonic"])
def test_a_bundle_round_trip_through_skops_keeps_probabilities(
    data: tuple[list[str], list[str]], calibration: str, tmp_path: Path
) -> None:
    """Either calibration (sigmoid: a private scikit-learn type on the voter's allow-list) loads from skops."""
    fitted = ClassicalModel(calibration=calibration).fit(*data)
    save(fitted, tmp_path)
    write_manifest(tmp_path, Manifest(name="t", version="v1"))
    core = load_core(tmp_path)
    assert core is not None
    texts = ["bake a salad", "cloud chip", "the coach", ""]
    for voter, p in fitted.predict_proba_all(texts).items():
        np.testing.assert_array_equal(core.model.predict_proba_all(texts)[voter], p)


def test_calibration_choice_is_recorded_per_model(model: ClassicalModel) -> None:
    for voter in model.voters_:
        entry = model.report_["calibration"][voter]
        assert entry["method"] in {"sigmoid", "isotonic"}
        assert entry["method"] == model.methods_[voter]
        assert entry["ece"][entry["method"]] == min(entry["ece"].values())


def test_fixed_calibration_skips_the_comparison(data: tuple[list[str], list[str]]) -> None:
    fixed = ClassicalModel(calibration="sigmoid").fit(*data)
    assert fixed.methods_ == {"tfidf_lr": "sigmoid", "tfidf_svm": "sigmoid"}
    assert fixed.report_["calibration"]["tfidf_lr"]["reason"] == "given"


def test_oof_probabilities_cover_every_text(model: ClassicalModel, data: tuple[list[str], list[str]]) -> None:
    oof = model.oof_proba(*data, n_splits=3)
    for p in oof.values():
        assert p.shape == (len(data[0]), 3)
        np.testing.assert_allclose(p.sum(axis=1), 1.0)


def test_oof_accuracy_is_below_in_sample_accuracy_on_noisy_labels() -> None:
    texts, labels = make_data(30, noise=0.4, seed=1)
    noisy = ClassicalModel(calibration="sigmoid").fit(texts, labels)
    y = np.searchsorted(noisy.classes_, labels)
    in_sample = noisy.predict_proba_all(texts)
    oof = noisy.oof_proba(texts, labels, n_splits=3)
    for voter in noisy.voters_:
        assert (oof[voter].argmax(1) == y).mean() < (in_sample[voter].argmax(1) == y).mean()


def test_predict_before_fit_raises() -> None:
    with pytest.raises(NotFittedError):
        ClassicalModel().predict(["hello"])


def test_fit_rejects_a_single_class() -> None:
    with pytest.raises(TrainingDataError, match="at least 2 classes"):
        ClassicalModel().fit(["a b", "c d"], ["x", "x"])


def test_oof_rejects_classes_smaller_than_the_fold_count(model: ClassicalModel) -> None:
    with pytest.raises(TrainingDataError, match="fewer than 5"):
        model.oof_proba(["goal", "pasta", "code"] * 4, ["sport", "food", "tech"] * 4)
