"""The feedback core: review priority, agreement among reviewers, rule statistics, label hygiene."""

from __future__ import annotations

from pathlib import Path

import pytest
from flockwatch.feedback.config import load_task
from flockwatch.feedback.hygiene import find_issues
from flockwatch.feedback.model import Correction, assess, resolve, reviewer_agreement, total_variation
from flockwatch.feedback.rulestats import RuleMeta, rule_stats

from tests.feedback_events import decision, vote

HARM = {"ham": 1.0, "spam": 2.0}.__getitem__
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_confident_agreeing_voters_need_no_review() -> None:
    d = decision("t", "ham", [vote("t", "a", {"ham": 0.9, "spam": 0.1}), vote("t", "b", {"ham": 0.8, "spam": 0.2})])
    a = assess(d, HARM, 2)
    assert not a.queued
    assert a.disagreement == 0.0


def test_disagreeing_voters_are_queued_with_the_harm_of_the_classes_in_play() -> None:
    d = decision("t", "ham", [vote("t", "a", {"ham": 0.9, "spam": 0.1}), vote("t", "b", {"ham": 0.1, "spam": 0.9})])
    a = assess(d, HARM, 2)
    assert a.queued and "voters disagree (ham, spam)" in a.reasons
    assert a.disagreement == pytest.approx(0.8)
    assert a.harm == 2.0 and a.priority == pytest.approx(1.6)


def test_abstention_and_a_large_set_are_queued_and_rank_above_either_alone() -> None:
    votes = [vote("t", "a", {"ham": 0.6, "spam": 0.4})]
    only_abstain = assess(decision("t", None, votes, confidence=0.6, prediction_set=["ham"], abstain=True), HARM, 2)
    both = assess(decision("t", None, votes, confidence=0.6, prediction_set=["ham", "spam"]), HARM, 2)
    assert only_abstain.queued and only_abstain.disagreement == pytest.approx(0.7)
    assert "prediction set of 2" in both.reasons
    assert both.priority > only_abstain.priority


def test_harm_ranks_equal_disagreement() -> None:
    harm = {"a": 1.0, "b": 1.0, "c": 5.0}.__getitem__
    low = assess(decision("t", None, [], prediction_set=["a", "b"]), harm, 3)
    high = assess(decision("t", None, [], prediction_set=["a", "c"]), harm, 3)
    assert high.disagreement == low.disagreement and high.priority == 5 * low.priority


def test_abstaining_voters_do_not_count_as_disagreement() -> None:
    d = decision("t", "ham", [vote("t", "a", {"ham": 0.9, "spam": 0.1}), vote("t", "regex", None)])
    assert not assess(d, HARM, 2).queued


def test_total_variation_is_zero_for_equal_and_one_for_disjoint() -> None:
    assert total_variation({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == 0.0
    assert total_variation({"a": 1.0}, {"b": 1.0}) == 1.0


def c(fid: str, seq: int, reviewer: str, label: str | None, *, down: bool = False, flagged: bool = False) -> Correction:
    return Correction(fid, seq, "t", reviewer, label, down, flagged)


def test_a_majority_resolves_a_label() -> None:
    res = resolve([c("1", 1, "r1", "spam"), c("2", 2, "r2", "spam"), c("3", 3, "r3", "ham")])
    assert (res.status, res.label) == ("resolved", "spam")
    assert res.disputed


def test_a_tie_is_a_conflict() -> None:
    res = resolve([c("1", 1, "r1", "spam"), c("2", 2, "r2", "ham")])
    assert (res.status, res.label) == ("conflict", None)
    assert res.votes == {"spam": ["r1"], "ham": ["r2"]}


def test_a_reviewer_who_changes_their_mind_counts_once() -> None:
    res = resolve([c("1", 1, "r1", "spam"), c("2", 2, "r2", "ham"), c("3", 3, "r1", "ham")])
    assert (res.status, res.label) == ("resolved", "ham")
    assert not res.disputed


def test_flagged_corrections_do_not_count() -> None:
    res = resolve([c("1", 1, "r1", "spam", flagged=True)])
    assert res.status == "flagged" and res.flagged == ("1",)
    res = resolve([c("1", 1, "r1", "spam", flagged=True), c("2", 2, "r2", "ham")])
    assert (res.status, res.label) == ("resolved", "ham")


def test_a_thumbs_down_disputes_a_single_label() -> None:
    assert resolve([c("1", 1, "r1", None, down=True)]).status == "thumbs_down"
    res = resolve([c("1", 1, "r1", "ham"), c("2", 2, "r2", None, down=True)])
    assert res.status == "conflict" and res.disputed


def test_reviewer_agreement_is_pairwise_on_shared_texts() -> None:
    groups = [
        [Correction("1", 1, "t1", "a", "spam"), Correction("2", 2, "t1", "b", "spam")],
        [
            Correction("3", 3, "t2", "a", "spam"),
            Correction("4", 4, "t2", "b", "ham"),
            Correction("5", 5, "t2", "c", "ham"),
        ],
        [Correction("6", 6, "t3", "a", "ham", flagged=True)],
    ]
    stats = {s.reviewer_id: s for s in reviewer_agreement(groups, {"t1": "spam", "t2": "ham", "t3": "ham"})}
    assert stats["a"].agreement == pytest.approx(1 / 3)
    assert stats["b"].agreement == pytest.approx(2 / 3)
    assert stats["c"].agreement == pytest.approx(1 / 2)
    assert stats["a"].labels == 3 and stats["a"].flagged == 1
    assert stats["a"].agreement_with_model == pytest.approx(2 / 3)


def test_rule_precision_uses_the_rule_label_or_its_safety_floor() -> None:
    meta = {
        "r-spam": RuleMeta("r-spam", label="spam"),
        "r-floor": RuleMeta("r-floor", min_label="spam"),
        "r-review": RuleMeta("r-review", review=True),
    }
    reviewed = [("r-spam", "spam"), ("r-spam", "ham"), ("r-spam", "spam"), ("r-floor", "spam"), ("r-review", "ham")]
    stats = {s.rule_id: s for s in rule_stats({"r-spam": 10, "r-floor": 1}, reviewed, meta, HARM, {"r-spam": 2})}
    assert stats["r-spam"].precision == pytest.approx(2 / 3)
    assert stats["r-spam"].confusions == {"ham": 1}
    assert stats["r-spam"].fires == 10 and stats["r-spam"].conflicts_with_rules == 2
    assert 0 < stats["r-spam"].precision_lower < stats["r-spam"].precision  # type: ignore[operator]
    assert stats["r-floor"].precision == 1.0
    assert stats["r-review"].precision is None and stats["r-review"].fires == 0


def test_rules_are_listed_worst_first() -> None:
    meta = {r: RuleMeta(r, label="spam") for r in ("good", "bad")}
    reviewed = [("good", "spam")] * 20 + [("bad", "ham")] * 5 + [("bad", "spam")]
    assert [s.rule_id for s in rule_stats({"good": 20, "bad": 6}, reviewed, meta, HARM)] == ["bad", "good"]


SPAM = [
    "WIN a free prize now, call 09061701461",
    "URGENT you have won £1000 cash claim now",
    "free entry text WIN to 85069",
]
HAM = ["are we still meeting for lunch today", "ok see you at home later", "can you pick up milk on the way"]


def test_hygiene_flags_planted_label_errors_but_not_consistent_corrections() -> None:
    texts = [f"{t} {i}" for i in range(8) for t in SPAM] + [f"{t} {i}" for i in range(8) for t in HAM]
    labels = ["spam"] * 24 + ["ham"] * 24
    labels[0] = "ham"  # a spam text labelled ham
    labels[30] = "spam"  # a ham text labelled spam
    report = find_issues(texts, labels, folds=4, min_rows=10)
    assert report.skipped is None and report.folds == 4
    assert {i.index for i in report.issues} == {0, 30}
    assert {(i.given, i.suggested) for i in report.issues} == {("ham", "spam"), ("spam", "ham")}


def test_hygiene_never_flags_protected_rows() -> None:
    texts = [f"{t} {i}" for i in range(8) for t in SPAM] + [f"{t} {i}" for i in range(8) for t in HAM]
    labels = ["spam"] * 24 + ["ham"] * 24
    labels[0] = "ham"
    protected = [i == 0 for i in range(48)]
    assert find_issues(texts, labels, protected=protected, folds=4, min_rows=10).issues == []


def test_hygiene_protects_an_honest_reviewer_and_catches_a_poisoner(data_files: dict[str, Path]) -> None:
    """The loop's poisoning scenario: a champion trained without 'call' spam; an honest reviewer corrects 60
    texts of a 'call' spam campaign it misses (and confirms 30 ordinary ham); a poisoner labels 60 ordinary
    'call' messages spam. The issue's bar: the honest reviewer's flagged share ≤ 10 %, the poisoner's ≥ 80 %."""
    import re

    from flockwatch.common.datasets import read_table
    from flockwatch.feedback.hygiene import _model

    call = re.compile(r"\bcall\b", re.IGNORECASE)
    rows = list(zip(*(lambda d: (d.texts, d.labels))(read_table(data_files["sms"], "text", "label")), strict=True))
    base = [(t, y) for t, y in rows[:1000] if not (y == "spam" and call.search(t))]
    live = [(t, y) for t, y in rows[1000:] if len(t) <= 1000]
    campaign = [t for t, y in live if y == "spam" and call.search(t)][:60]
    ordinary = [t for t, y in live if y == "ham" and not call.search(t)][:30]
    poison = [t for t, y in live if y == "ham" and call.search(t)][:60]
    champion = _model(0).fit([t for t, _ in base], [y for _, y in base])  # stands in for the deployed ensemble
    texts = campaign + ordinary + poison
    labels = ["spam"] * 60 + ["ham"] * 30 + ["spam"] * 60
    reviewers = ["honest"] * 90 + ["poisoner"] * 60
    deployed = [dict(zip(champion.classes_, map(float, p), strict=True)) for p in champion.predict_proba(texts)]

    report = find_issues(texts, labels, reviewers=reviewers, deployed=deployed, folds=5)
    flagged = {i.index for i in report.issues}
    assert len(flagged & set(range(90))) <= 9  # ≤ 10 % of the honest reviewer's labels
    assert len(flagged & set(range(90, 150))) >= 48  # ≥ 80 % of the poisoner's
    assert report.reviewers["honest"] > 0.9 > 0.5 > report.reviewers["poisoner"]
    # what the check did before reviewers and the deployed model weighed in: nothing caught
    assert not {i.index for i in find_issues(texts, labels, folds=5).issues} & set(range(90, 150))


def test_hygiene_skips_too_little_data_and_says_why() -> None:
    report = find_issues(["a", "b", "c"], ["x", "y", "x"], min_rows=20)
    assert report.issues == [] and "at least 20" in (report.skipped or "")
    report = find_issues(["a"] * 30, ["x"] * 29 + ["y"], min_rows=20)
    assert "two classes" in (report.skipped or "")


def test_task_config_reads_harm_weights_and_what_each_rule_claims(tmp_path: Path) -> None:
    task = load_task(CONFIGS / "birdflu" / "labels.yaml", CONFIGS / "birdflu" / "rules.yaml", None)
    assert task.classes == ["irrelevant", "informational", "misinformation", "high_risk"]
    assert task.harm("high_risk") == 5.0 and task.harm("unknown") == 1.0
    assert task.rules["fake-cure"].min_label == "high_risk"
    assert any(meta.review and meta.label is None for meta in task.rules.values())
    assert load_task(None, None, tmp_path).classes is None  # no bundle there: any label accepted, harm 1
