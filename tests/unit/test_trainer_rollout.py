"""The safe-rollout rules: when a challenger in shadow may be promoted, when a published version is rolled back."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flockwatch.trainer import evaluate
from flockwatch.trainer.rollout import Rollout, ShadowRow, judge_shadow, judge_watch


def _rows(spec: list[tuple[str | None, str | None, str | None, int]]) -> list[ShadowRow]:
    return [ShadowRow(champion, challenger, label) for champion, challenger, label, n in spec for _ in range(n)]


def test_a_challenger_that_agrees_and_answers_as_much_is_promoted() -> None:
    verdict = judge_shadow(_rows([("ham", "ham", None, 90), ("spam", "spam", "spam", 10)]), 0.5, 0.05)
    assert verdict.passed and verdict.reasons == [] and verdict.n == 100
    assert verdict.agreement == 1.0 and verdict.corrected == 10 and verdict.champion_wrong == 0


def test_abstaining_more_on_live_texts_than_the_margin_allows_is_rejected() -> None:
    rows = _rows([("ham", "ham", None, 80), ("ham", None, None, 20)])
    assert not judge_shadow(rows, 0.5, 0.05).passed
    assert judge_shadow(rows, 0.5, 0.25).passed  # within a wider margin
    verdict = judge_shadow(rows, 0.5, 0.05)
    assert verdict.challenger_coverage == 0.8 and "live coverage" in verdict.reasons[0]


def test_more_wrong_answers_on_corrected_live_texts_is_rejected() -> None:
    rows = _rows([("ham", "ham", None, 90), ("spam", "ham", "spam", 3), ("ham", "spam", "spam", 2)])
    verdict = judge_shadow(rows, 0.5, 0.05)
    assert not verdict.passed and (verdict.challenger_wrong, verdict.champion_wrong) == (3, 2)


def test_low_agreement_needs_the_corrections_on_its_side() -> None:
    # a campaign the champion misses: the challenger disagrees on most texts, and the corrections back it
    backed = _rows([("ham", "spam", "spam", 30), ("ham", "spam", None, 30), ("ham", "ham", None, 20)])
    assert judge_shadow(backed, 0.5, 0.05).passed
    # the same disagreement with no correction to settle it
    unbacked = _rows([("ham", "spam", None, 60), ("ham", "ham", None, 20)])
    verdict = judge_shadow(unbacked, 0.5, 0.05)
    assert not verdict.passed and "live agreement 0.250" in verdict.reasons[0]


def test_no_live_text_promotes_on_the_offline_gate_alone() -> None:
    verdict = judge_shadow([], 0.5, 0.05)
    assert verdict.passed and verdict.n == 0 and "offline gate alone" in verdict.note


def test_the_watch_rolls_back_only_a_significant_regression_beyond_the_margin() -> None:
    assert judge_watch(50, 25, 100, 10, 0.05, 0.05).rollback  # 50 % vs 10 %
    assert not judge_watch(50, 7, 100, 10, 0.05, 0.05).rollback  # 14 % vs 10 %: within noise
    assert not judge_watch(50, 25, 100, 10, 0.5, 0.05).rollback  # beyond a 50-point margin only
    assert not judge_watch(5, 2, 100, 10, 0.05, 0.05).rollback  # 2 of 5: not significant
    assert not judge_watch(50, 50, 0, 0, 0.05, 0.05).rollback  # nothing to compare with
    verdict = judge_watch(50, 25, 100, 10, 0.05, 0.05)
    assert verdict.p_value < 0.001 and "25/50" in verdict.reason and "10/100" in verdict.reason


def test_the_candidate_in_shadow_is_loaded_once_not_at_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[Path] = []

    def load_cores(bundle: Path) -> list[Any]:
        loads.append(bundle)
        return [f"cores of {bundle.name}"]

    def decide_all(bundle: Path, texts: list[str], cores: list[Any]) -> Any:
        assert cores == [f"cores of {bundle.name}"]
        return SimpleNamespace(
            decisions=[SimpleNamespace(abstain=False, prediction="ham", confidence=0.9)] * len(texts)
        )

    monkeypatch.setattr(evaluate, "load_cores", load_cores)
    monkeypatch.setattr(evaluate, "decide_all", decide_all)
    rollout = Rollout(None)  # type: ignore[arg-type]  # the decide step needs no service
    a, b = Path("/bundles/v2"), Path("/bundles/v3")
    for _ in range(3):
        assert rollout._decide(a, ["x", "y"]) == [("ham", 0.9), ("ham", 0.9)]
    rollout._decide(b, ["x"])
    rollout._decide(b, ["x"])
    assert loads == [a, b]  # one load per candidate, a new candidate loads its own
