"""The LLM voter's pure core: answer-word log-probabilities → class probabilities, temperature, abstentions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from flockwatch.common.labels import LabelConfig
from flockwatch.llm_voter.config import LoraConfig
from flockwatch.llm_voter.model import INVALID, UNSURE, LLMCore, fit_temperature, softmax
from flockwatch.llm_voter.prompt import LabelWordError, Prompt, single_token_ids

LABELS = LabelConfig.model_validate(
    {
        "task": "sms",
        "description": "SMS spam filtering.",
        "labels": [{"name": "ham", "description": "An ordinary message."}, {"name": "spam", "description": "An ad."}],
    }
)


class FakeScorer:
    """Answers fixed log-probabilities per text (class words, then abstain)."""

    def __init__(self, answers: dict[str, list[float] | None]) -> None:
        self.answers = answers

    def score(self, texts: Sequence[str]) -> list[list[float] | None]:
        return [self.answers[t] for t in texts]


class FakeTokenizer:
    """One token per known word; unknown words split into characters."""

    vocab = {"personal": 1, "advert": 2, "unknown": 3}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.vocab[text]] if text in self.vocab else [ord(c) for c in text]


def core(answers: dict[str, list[float] | None], temperature: float = 1.0) -> LLMCore:
    return LLMCore(FakeScorer(answers), ("ham", "spam"), "v1", temperature, min_label_mass=0.5)


def test_class_probabilities_are_the_answer_words_renormalized_in_label_order() -> None:
    lp = [math.log(0.6), math.log(0.3), math.log(0.05)]
    opinion = core({"t": lp}).predict(["t"])["llm"][0]
    assert opinion.probabilities == pytest.approx({"ham": 2 / 3, "spam": 1 / 3})
    assert list(opinion.probabilities or {}) == ["ham", "spam"]


def test_temperature_above_one_softens_and_keeps_the_winner() -> None:
    lp = [math.log(0.9), math.log(0.08), math.log(0.01)]
    sharp = core({"t": lp}).predict(["t"])["llm"][0].probabilities or {}
    soft = core({"t": lp}, temperature=3.0).predict(["t"])["llm"][0].probabilities or {}
    assert soft["ham"] < sharp["ham"] and soft["ham"] > soft["spam"]


def test_masked_words_reported_as_minus_9999_get_probability_zero() -> None:
    assert softmax(np.array([[-0.1, -9999.0]]))[0].tolist() == pytest.approx([1.0, 0.0])


def test_abstain_word_winning_is_an_abstention_and_counted() -> None:
    c = core({"t": [math.log(0.2), math.log(0.1), math.log(0.65)]})
    opinion = c.predict(["t"])["llm"][0]
    assert opinion.abstains and opinion.abstain_reason == UNSURE
    assert c.counts.unsure == 1 and c.counts.invalid == 0


@pytest.mark.parametrize(
    "answer",
    [None, [math.log(0.1), math.log(0.1), math.log(0.1)], [0.0, -1.0]],
    ids=["no-answer", "mass-below-minimum", "wrong-length"],
)
def test_invalid_output_abstains_and_is_counted(answer: list[float] | None) -> None:
    c = core({"ok": [math.log(0.7), math.log(0.2), math.log(0.05)], "bad": answer})
    ok, bad = c.predict(["ok", "bad"])["llm"]
    assert not ok.abstains
    assert bad.abstains and bad.abstain_reason == INVALID
    assert c.counts.as_dict() == {"scored": 2, "invalid": 1, "unsure": 0}


def test_fit_temperature_recovers_overconfidence() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    true_logit = rng.normal(0, 1.5, 2000)
    p1 = 1 / (1 + np.exp(-true_logit))
    y = (rng.random(2000) < p1).astype(int)
    logits = np.stack([np.zeros(2000), true_logit * 3.0], axis=1)  # three times too confident
    assert fit_temperature(logits, y) == pytest.approx(3.0, rel=0.15)


def test_prompt_lists_every_class_word_with_its_description_and_the_abstain_word() -> None:
    prompt = Prompt.from_labels(LABELS, ["personal", "advert"], "unknown")
    system = prompt.system()
    assert "personal: An ordinary message." in system and "advert: An ad." in system and "unknown" in system
    assert prompt.all_words == ("personal", "advert", "unknown")
    assert prompt.messages("hi   there")[1]["content"] == "Text: hi there"
    assert Prompt.from_json(prompt.to_json()) == prompt


def test_single_token_check_names_the_multi_token_word() -> None:
    assert single_token_ids(FakeTokenizer(), ["personal", "advert", "unknown"]) == [1, 2, 3]
    with pytest.raises(LabelWordError, match="'spam' → 4 tokens"):
        single_token_ids(FakeTokenizer(), ["personal", "spam", "unknown"])


def test_label_words_default_to_lowercased_names_and_must_be_distinct() -> None:
    config = LoraConfig(label_words={"sms": {"spam": "advert"}})
    assert config.words_for("sms", ["ham", "spam"]) == ["ham", "advert"]
    with pytest.raises(ValueError, match="not distinct"):
        LoraConfig(abstain_word="ham").words_for("sms", ["ham", "spam"])


def test_lora_yaml_errors_name_file_and_line(tmp_path: object) -> None:
    from pathlib import Path

    from flockwatch.common.yamlconfig import ConfigError

    path = Path(str(tmp_path)) / "llm_lora.yaml"
    path.write_text("r: 16\ndropout: 1.5\n")
    with pytest.raises(ConfigError, match=r"llm_lora.yaml:2: dropout"):
        LoraConfig.load(path)


def test_best_checkpoint_is_the_calibrated_one_among_the_skilled() -> None:
    from flockwatch.llm_voter.lora import _Checkpoints

    # the validation history of a real SMS run: a low ECE at step 79 with far less skill must not win,
    # and neither may step 40, which was the best only until step 60 raised the F1 bar
    checkpoints = _Checkpoints(f1_tolerance=0.02, min_delta=0.002)
    history = [(20, 0.454, 0.132), (40, 0.717, 0.059), (60, 0.844, 0.063), (79, 0.699, 0.047)]
    improved = [checkpoints.add(step, f1, ece, {"step": step}) for step, f1, ece in history]
    assert improved == [True, True, True, False] and checkpoints.best.step == 60
    checkpoints.add(99, 0.835, 0.030, {})  # as skilled (within the tolerance) and better calibrated
    assert checkpoints.best.step == 99
    checkpoints.add(119, 0.84, 0.031, {})  # within min_delta of the lowest ECE: the better F1 wins
    assert checkpoints.best.step == 119
