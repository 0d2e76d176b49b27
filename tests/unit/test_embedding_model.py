"""The embedding voter's core with a fake encoder: cache, batching, the calibrated head, out-of-fold outputs."""

import hashlib
import pickle

import numpy as np
import pytest
from flockwatch.classical_voter.embedding import VOTER, CachedEncoder, EmbeddingCache, EmbeddingHead, EmbeddingModel
from flockwatch.classical_voter.model import TrainingDataError
from numpy.typing import NDArray
from sklearn.exceptions import NotFittedError

from tests.unit.test_classical_model import make_data

DIM = 64


class FakeEmbed:
    """Hashed bag of words, L2-normalized (like MiniLM's output); records the batches it was given."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def __call__(self, texts: list[str]) -> NDArray[np.float32]:
        self.batches.append(list(texts))
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.split():
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % DIM] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    @property
    def embedded(self) -> int:
        return sum(map(len, self.batches))


@pytest.fixture(scope="module")
def data() -> tuple[list[str], list[str]]:
    return make_data(30, noise=0.1)


@pytest.fixture(scope="module")
def model(data: tuple[list[str], list[str]]) -> EmbeddingModel:
    return EmbeddingModel(CachedEncoder(FakeEmbed(), batch_size=16), EmbeddingHead()).fit(*data)


def test_encoder_embeds_in_batches_of_at_most_batch_size() -> None:
    embed = FakeEmbed()
    rows = CachedEncoder(embed, batch_size=4).encode([f"text {i}" for i in range(10)])
    assert rows.shape == (10, DIM)
    assert [len(b) for b in embed.batches] == [4, 4, 2]


def test_batched_encoding_equals_one_by_one() -> None:
    texts = [f"goal match {i} pasta" for i in range(9)]
    batched = CachedEncoder(FakeEmbed(), batch_size=4).encode(texts)
    single = np.vstack([CachedEncoder(FakeEmbed(), batch_size=1).encode([t]) for t in texts])
    np.testing.assert_allclose(batched, single)


def test_cache_hits_skip_the_encoder_and_duplicates_are_embedded_once() -> None:
    embed = FakeEmbed()
    encoder = CachedEncoder(embed, batch_size=8)
    first = encoder.encode(["a b", "c d", "a b"])
    assert embed.embedded == 2 and encoder.cache.misses == 3
    again = encoder.encode(["c d", "a b"])
    assert embed.embedded == 2 and encoder.cache.hits == 2
    np.testing.assert_array_equal(again, first[[1, 0]])


def test_cache_is_bounded_and_drops_the_least_recently_used() -> None:
    cache = EmbeddingCache(maxsize=2)
    a, b, c = (EmbeddingCache.key(t) for t in "abc")
    row = np.zeros(3, dtype=np.float32)
    cache.put(a, row)
    cache.put(b, row)
    assert cache.get(a) is not None  # a is now the most recently used
    cache.put(c, row)
    assert len(cache) == 2 and cache.get(b) is None and cache.get(a) is not None


def test_cache_size_zero_keeps_nothing() -> None:
    embed = FakeEmbed()
    encoder = CachedEncoder(embed, cache_size=0)
    encoder.encode(["x"])
    encoder.encode(["x"])
    assert embed.embedded == 2 and len(encoder.cache) == 0


def test_probabilities_sum_to_one_in_sorted_class_order(model: EmbeddingModel) -> None:
    probs = model.predict_proba(["goal match team", "pasta oven sauce", "laptop python code"])
    assert model.classes == ["food", "sport", "tech"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert list(probs.argmax(axis=1)) == [1, 0, 2]


def test_calibration_choice_is_reported(model: EmbeddingModel) -> None:
    choice = model.head.choice_
    assert choice["method"] == model.head.method_
    assert set(choice["ece"]) == {"temperature", "sigmoid", "isotonic"}


def test_predict_gives_one_opinion_per_text_under_the_voter_name(model: EmbeddingModel) -> None:
    opinions = model.predict(["goal match team", "pasta oven sauce"])
    assert list(opinions) == [VOTER]
    assert [max(o.probabilities, key=o.probabilities.__getitem__) for o in opinions[VOTER]] == ["sport", "food"]


def test_empty_input_gives_empty_output(model: EmbeddingModel) -> None:
    assert model.predict_proba([]).shape == (0, 3)


def test_oof_covers_every_train_text_without_refitting_the_encoder(data: tuple[list[str], list[str]]) -> None:
    embed = FakeEmbed()
    model = EmbeddingModel(CachedEncoder(embed), EmbeddingHead()).fit(*data)
    oof = model.oof_proba(*data, n_splits=5)
    assert oof.shape == (len(data[0]), 3) and not np.isnan(oof).any()
    np.testing.assert_allclose(oof.sum(axis=1), 1.0)
    assert embed.embedded == len(set(data[0]))  # each text embedded once, for fit and all folds
    accuracy = (np.array(model.classes)[oof.argmax(axis=1)] == np.array(data[1])).mean()
    assert accuracy > 0.7


def test_oof_refuses_labels_the_head_was_not_fitted_on(model: EmbeddingModel) -> None:
    texts, labels = make_data(10)
    with pytest.raises(TrainingDataError, match="not among the fitted classes"):
        model.oof_proba(texts, [lab.replace("tech", "news") for lab in labels])


def test_unfitted_head_refuses_to_predict() -> None:
    with pytest.raises(NotFittedError):
        EmbeddingHead().predict_proba(np.zeros((1, DIM)))


def test_given_calibration_is_used_and_a_bad_one_refused(data: tuple[list[str], list[str]]) -> None:
    x = FakeEmbed()(data[0])
    assert EmbeddingHead(calibration="sigmoid").fit(x, data[1]).method_ == "sigmoid"
    with pytest.raises(ValueError, match="calibration"):
        EmbeddingHead(calibration="platt").fit(x, data[1])


def test_head_pickles_without_the_encoder(model: EmbeddingModel) -> None:
    head = pickle.loads(pickle.dumps(model.head))
    x = model.encoder.encode(["goal match"])
    np.testing.assert_allclose(head.predict_proba(x), model.head.predict_proba(x))
