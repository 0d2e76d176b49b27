"""Property tests (hypothesis) for the bus messages: every valid message survives a JSON round trip; any other
input is refused with a ValidationError (what the bus dead-letters), never another exception; the contract's
invariants hold for whatever validates; a dead letter of any payload stays within its size budget."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import pytest
from flockwatch.common.bus import _clip, _json_size
from flockwatch.common.events import (
    CascadeRound,
    DeadLetter,
    Decision,
    Event,
    FeedbackSubmitted,
    ModelPublished,
    SafetyTrigger,
    TextSubmitted,
    Vote,
    VoteRequested,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

SETTINGS = settings(max_examples=100, deadline=None)
MODELS: list[type[Event]] = [
    TextSubmitted,
    Vote,
    VoteRequested,
    Decision,
    FeedbackSubmitted,
    ModelPublished,
    DeadLetter,
]

ids = st.text(min_size=1, max_size=40)
labels = st.text(min_size=1, max_size=12)
words = st.text(max_size=40)
zones = st.sampled_from([None, UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))])
times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=cast(Any, zones))


@st.composite
def distributions(draw: st.DrawFn) -> dict[str, float]:
    """Class probabilities that sum to 1 (within the contract's 1e-3)."""
    names = draw(st.lists(labels, min_size=1, max_size=5, unique=True))
    weights = draw(st.lists(st.floats(0.0, 1.0), min_size=len(names), max_size=len(names)))
    total = sum(weights)
    if total < 1e-6:
        return {n: 1 / len(names) for n in names}
    return {n: w / total for n, w in zip(names, weights, strict=True)}


def votes() -> st.SearchStrategy[Vote]:
    common = {"message_id": ids, "timestamp": times, "text_id": ids, "voter": labels, "model_version": words}
    common |= {"latency_ms": st.floats(0, 1e6), "evidence": st.lists(words, max_size=3)}
    common |= {"safety": st.lists(st.builds(SafetyTrigger, rule_id=ids, min_label=st.none() | labels), max_size=2)}
    answering = st.builds(Vote, probabilities=distributions(), abstain=st.just(False), **common)
    abstaining = st.builds(
        Vote, probabilities=st.none(), abstain=st.just(True), abstain_reason=st.text(min_size=1), **common
    )
    return answering | abstaining


events: st.SearchStrategy[Event] = st.one_of(
    st.builds(
        TextSubmitted,
        message_id=ids,
        timestamp=times,
        text_id=st.text(min_size=1, max_size=128),
        text=st.text(min_size=1),
        metadata=st.dictionaries(words, words, max_size=3),
    ),
    votes(),
    st.builds(
        VoteRequested,
        message_id=ids,
        timestamp=times,
        text_id=ids,
        text=st.text(min_size=1),
        voters=st.lists(labels, min_size=1, max_size=3),
        reason=words,
        deadline_ms=st.floats(min_value=0.001, max_value=1e7),
        tier=st.integers(1, 5),
    ),
    st.builds(
        Decision,
        message_id=ids,
        timestamp=times,
        text_id=ids,
        prediction=st.none() | labels,
        confidence=st.floats(0, 1),
        abstain=st.booleans(),
        prediction_set=st.lists(labels, max_size=3),
        probabilities=distributions(),
        path=st.sampled_from(["consensus", "combiner", "no_votes"]),
        votes=st.lists(votes(), max_size=2),
        rounds=st.lists(
            st.builds(
                CascadeRound,
                tier=st.integers(0, 3),
                voters=st.lists(labels, max_size=2),
                prediction_set=st.lists(labels, max_size=2),
                confidence=st.floats(0, 1),
                reason=words,
            ),
            max_size=2,
        ),
        arbiter_version=words,
        thresholds=st.dictionaries(words, st.floats(allow_nan=False, allow_infinity=False), max_size=2),
        latency_ms=st.floats(0, 1e7),
    ),
    st.builds(
        FeedbackSubmitted,
        message_id=ids,
        timestamp=times,
        text_id=ids,
        label=labels,
        thumbs=st.none() | st.sampled_from(["up", "down"]),
        note=st.none() | st.text(max_size=50),
        reviewer_id=ids,
    ),
    st.builds(
        ModelPublished,
        message_id=ids,
        timestamp=times,
        component=words,
        version=words,
        path=words,
        manifest_sha256=words,
        metrics=st.dictionaries(words, st.floats(allow_nan=False, allow_infinity=False), max_size=3),
    ),
    st.builds(
        DeadLetter,
        message_id=ids,
        timestamp=times,
        topic=words,
        consumer=words,
        error=words,
        payload=st.text(max_size=200),
        payload_size=st.integers(0, 10**9),
        truncated=st.booleans(),
    ),
)


@SETTINGS
@given(events)
def test_every_valid_message_survives_a_json_round_trip_with_its_timestamp_in_utc(event: Event) -> None:
    again = type(event).model_validate_json(event.model_dump_json())
    assert again == event
    assert event.timestamp.utcoffset() == timedelta(0)  # naive times are taken as UTC, others converted
    assert again.key == event.key and again.TOPIC == event.TOPIC


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)


@SETTINGS
@given(st.sampled_from(MODELS), json_values | st.binary(max_size=60))
def test_any_other_input_is_refused_with_a_validation_error(model: type[Event], raw: Any) -> None:
    payload = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    try:
        message = model.model_validate_json(payload)
    except ValidationError:
        return
    assert message.message_id  # what validates is a whole message


@SETTINGS
@given(events, st.integers().filter(lambda v: v != 1), st.text(min_size=1, max_size=10))
def test_another_schema_version_or_an_unknown_field_is_refused(event: Event, version: int, field: str) -> None:
    data = event.model_dump(mode="json")
    with pytest.raises(ValidationError, match="schema_version"):
        type(event).model_validate_json(json.dumps({**data, "schema_version": version}))
    if field not in data:
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            type(event).model_validate_json(json.dumps({**data, field: 1}))


@SETTINGS
@given(
    st.dictionaries(labels, st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 1), max_size=4),
    st.booleans(),
)
def test_a_vote_that_validates_abstains_with_a_reason_or_has_probabilities_summing_to_one(
    probabilities: dict[str, float], abstain: bool
) -> None:
    try:
        vote = Vote(
            message_id="m",
            text_id="t",
            voter="v",
            model_version="1",
            probabilities=probabilities or None,
            abstain=abstain,
            abstain_reason="because" if abstain else None,
            latency_ms=0,
        )
    except ValidationError:
        return
    if vote.abstain:
        assert vote.abstain_reason
    else:
        assert vote.probabilities is not None
        assert all(math.isfinite(p) and 0 <= p <= 1 for p in vote.probabilities.values())
        assert math.isclose(sum(vote.probabilities.values()), 1.0, abs_tol=1e-3)


@SETTINGS
@given(st.text(max_size=3000), st.integers(6, 2000))
def test_a_clipped_dead_letter_payload_is_the_longest_prefix_within_its_byte_budget(text: str, limit: int) -> None:
    kept = _clip(text, limit)
    assert text.startswith(kept)
    assert _json_size(kept) <= limit or kept == text and _json_size(text) <= limit
    if kept != text:
        assert _json_size(text[: len(kept) + 1]) > limit  # one character more would not fit
