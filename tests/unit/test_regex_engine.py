"""The rule engine: firing, priorities, tie mixing, abstention, safety, evidence, version and traces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flockwatch.common.events import SafetyTrigger
from flockwatch.common.labels import LabelConfig
from flockwatch.common.voting import Opinion
from flockwatch.common.yamlconfig import ConfigError
from flockwatch.regex_voter.model import RuleEngine
from flockwatch.regex_voter.rules import RuleSet, load_rules

ROOT = Path(__file__).resolve().parents[2]
LABELS = LabelConfig.from_names("t", ["ham", "spam", "other"])


def engine(*rules: dict[str, Any], defaults: dict[str, Any] | None = None, labels: LabelConfig = LABELS) -> RuleEngine:
    return RuleEngine(RuleSet.model_validate({"defaults": defaults or {}, "rules": list(rules)}), labels)


def rule(rule_id: str, label: str | None = "spam", **fields: Any) -> dict[str, Any]:
    return {"id": rule_id, "label": label, "patterns": ["x"], **fields}


def one(e: RuleEngine, text: str = "x") -> Opinion:
    return e.predict([text])[0]


def test_rule_fires_when_any_pattern_matches() -> None:
    e = engine(rule("r", patterns=["apple", "pear"]))
    assert [o.evidence for o in e.predict(["a pear", "a plum"])] == [("r",), ()]


def test_all_mode_needs_every_pattern() -> None:
    e = engine(rule("r", patterns=["apple", "pear"], match="all"))
    assert [o.abstains for o in e.predict(["apple", "apple and pear"])] == [True, False]


def test_exclusion_blocks_the_rule() -> None:
    e = engine(rule("r", patterns=["prize"], exclude=["no prize"]))
    assert [o.abstains for o in e.predict(["a prize", "there is no prize"])] == [False, True]


def test_flags_apply_to_patterns_and_exclusions() -> None:
    e = engine(rule("r", patterns=["prize"], exclude=["later"]), defaults={"flags": ["IGNORECASE"]})
    assert [o.abstains for o in e.predict(["PRIZE", "PRIZE Later"])] == [False, True]


def test_empty_rule_flags_make_it_case_sensitive() -> None:
    e = engine(rule("r", patterns=["FREE"], flags=[]), defaults={"flags": ["IGNORECASE"]})
    assert [o.abstains for o in e.predict(["FREE", "free"])] == [False, True]


def test_winner_gets_its_confidence_and_the_rest_is_spread_evenly() -> None:
    assert one(engine(rule("r", confidence=0.8))).probabilities == pytest.approx(
        {"ham": 0.1, "spam": 0.8, "other": 0.1}
    )


def test_rules_without_confidence_take_the_default() -> None:
    assert one(engine(rule("r"), defaults={"confidence": 0.7})).probabilities["spam"] == pytest.approx(0.7)


def test_highest_priority_wins() -> None:
    e = engine(rule("low", "ham", priority=1, confidence=0.99), rule("high", "spam", priority=5, confidence=0.6))
    assert one(e).probabilities["spam"] == pytest.approx(0.6)


def test_tie_on_the_same_label_takes_the_best_confidence() -> None:
    e = engine(rule("a", confidence=0.7), rule("b", confidence=0.9))
    assert one(e).probabilities == pytest.approx({"ham": 0.05, "spam": 0.9, "other": 0.05})


def test_tie_on_different_labels_mixes_them_by_confidence() -> None:
    e = engine(rule("a", "spam", confidence=0.9), rule("b", "ham", confidence=0.6))
    assert one(e).probabilities == pytest.approx({"ham": 0.36, "spam": 0.54, "other": 0.1})


def test_tie_on_every_label_spreads_the_rest_over_all_labels() -> None:
    two = LabelConfig.from_names("t", ["ham", "spam"])
    e = engine(rule("a", "spam", confidence=0.8), rule("b", "ham", confidence=0.8), labels=two)
    assert one(e).probabilities == pytest.approx({"ham": 0.5, "spam": 0.5})


@pytest.mark.parametrize("confidences", [(0.9,), (0.9, 0.6), (0.51, 0.51, 0.99), (1.0, 0.4)])
def test_probabilities_sum_to_one(confidences: tuple[float, ...]) -> None:
    labels = ["ham", "spam", "other"]
    e = engine(*(rule(f"r{i}", labels[i % 3], confidence=c) for i, c in enumerate(confidences)))
    assert sum(one(e).probabilities.values()) == pytest.approx(1.0)


def test_probabilities_follow_the_label_config_order() -> None:
    assert list(one(engine(rule("r"))).probabilities) == ["ham", "spam", "other"]


def test_abstains_when_no_rule_matches() -> None:
    opinion = one(engine(rule("r")), "nothing here")
    assert opinion.probabilities is None and opinion.abstain_reason == "no rule matched"


def test_abstains_when_only_safety_rules_match() -> None:
    opinion = one(engine(rule("watch", None, safety={"review": True})))
    assert opinion.abstain_reason == "only safety rules matched"
    assert opinion.safety == (SafetyTrigger(rule_id="watch", review=True),)


def test_safety_of_every_fired_rule_is_reported() -> None:
    e = engine(
        rule("winner", "ham", priority=9),
        rule("floor", "spam", priority=1, safety={"min_label": "spam"}),
        rule("review", None, safety={"review": True}),
        rule("silent", "other", patterns=["y"], safety={"review": True}),
    )
    assert {s.rule_id for s in one(e).safety} == {"floor", "review"}
    assert one(e).safety[0] == SafetyTrigger(rule_id="floor", min_label="spam", review=False)


def test_evidence_lists_fired_rules_winner_first() -> None:
    e = engine(
        rule("safety-only", None, priority=50, safety={"review": True}),
        rule("second", "ham", priority=1),
        rule("winner", "spam", priority=3),
        rule("quiet", "spam", patterns=["y"]),
    )
    assert one(e).evidence == ("winner", "second", "safety-only")


def test_version_is_12_hex_and_the_same_for_the_same_rules() -> None:
    a = engine(rule("r", description="one"), defaults={"confidence": 0.8})
    b = engine(rule("r", description="two", confidence=0.8))
    assert len(a.version) == 12 and int(a.version, 16) >= 0
    assert a.version == b.version


def test_version_changes_when_a_pattern_changes() -> None:
    assert engine(rule("r", patterns=["a"])).version != engine(rule("r", patterns=["b"])).version


def test_engine_rejects_rules_with_unknown_labels() -> None:
    with pytest.raises(ConfigError, match="unknown label 'eggs'"):
        engine(rule("r", "eggs"))


def test_explain_reports_matched_patterns_with_their_spans() -> None:
    trace = engine(rule("r", patterns=[r"\bwon\b", r"prize\w*", "absent"])).explain("you won prizes")[0]
    assert trace.fired
    assert [(m.pattern, m.text, m.start) for m in trace.matched] == [(r"\bwon\b", "won", 4), (r"prize\w*", "prizes", 8)]
    assert "on 'prizes'" in trace.reason


def test_explain_reports_the_blocking_exclusion() -> None:
    trace = engine(rule("r", patterns=["prize"], exclude=["no prize"])).explain("no prize today")[0]
    assert not trace.fired
    assert trace.blocked_by is not None and trace.blocked_by.text == "no prize"
    assert trace.reason.startswith("blocked by exclusion /no prize/")


def test_explain_reports_the_missing_all_pattern() -> None:
    trace = engine(rule("r", patterns=["apple", "pear"], match="all")).explain("apple pie")[0]
    assert not trace.fired and trace.missing == ("pear",)
    assert trace.reason == "missing /pear/"


def test_explain_covers_every_rule_in_file_order() -> None:
    e = engine(rule("b", patterns=["y"]), rule("a"), rule("c", None, safety={"review": True}))
    assert [(t.rule_id, t.fired) for t in e.explain("x")] == [("b", False), ("a", True), ("c", True)]


def test_any_rule_with_backreferences_keeps_its_meaning() -> None:
    e = engine(rule("r", patterns=[r"(\w)\1", "zzz"]))
    assert [o.abstains for o in e.predict(["book", "bok", "zzz"])] == [False, True, False]


def test_any_rule_with_inline_global_flags_keeps_its_meaning() -> None:
    e = engine(rule("r", patterns=["(?i)free", "WIN"]))
    assert [o.abstains for o in e.predict(["FREE", "win", "WIN"])] == [False, True, False]


def test_verbose_patterns_with_comments_keep_their_meaning() -> None:
    e = engine(rule("r", patterns=["prize  # the prize", "cash # money"]), defaults={"flags": ["VERBOSE"]})
    assert [o.abstains for o in e.predict(["cash", "prize", "none"])] == [False, False, True]


SAMPLES = [
    "Ok lar... Joking wif u oni...",
    "Free entry in 2 a wkly comp to win FA Cup final tkts. Text FA to 87121 to receive entry T&C's apply",
    "WINNER!! You have been selected to receive a £900 prize reward! Call 09061701461. Valid 12 hours only.",
    "I'm gonna be home soon and i don't want to talk about this stuff anymore tonight :)",
    "Txt STOP to 85069 to unsubscribe. 150p/msg",
    "Who was the first man to walk on the moon ?",
    "What does NASA stand for ?",
    "How many people live in Tokyo ?",
    "Where did the term `` 86 '' come from ?",
    "How do you say `` fresh '' in Spanish ?",
    "What is a caldera ?",
    "What color is a giraffe 's tongue ?",
]


@pytest.mark.parametrize("task", ["sms", "trec", "birdflu"])
def test_explain_agrees_with_predict_on_bundled_rules(task: str) -> None:
    labels = LabelConfig.load(ROOT / "configs" / task / "labels.yaml")
    e = RuleEngine(load_rules(ROOT / "configs" / task / "rules.yaml", labels), labels)
    for text, opinion in zip(SAMPLES, e.predict(SAMPLES), strict=True):
        assert {t.rule_id for t in e.explain(text) if t.fired} == set(opinion.evidence)


def test_sms_rules_call_prize_texts_spam() -> None:
    labels = LabelConfig.load(ROOT / "configs" / "sms" / "labels.yaml")
    e = RuleEngine(load_rules(ROOT / "configs" / "sms" / "rules.yaml", labels), labels)
    opinion = one(e, "URGENT! You have won a £1000 prize. Call 09061701461 to claim")
    assert opinion.probabilities is not None and opinion.probabilities["spam"] > 0.9
