"""When a consumer waits for its next batch to fill (`Linger`): only under load, counted in texts."""

from __future__ import annotations

import pytest
from flockwatch.common.bus import Linger


def feed(linger: Linger, batches: list[list[str]], every_s: float, full: bool = False) -> list[float]:
    """Batches handed to `linger` `every_s` apart (the clock moved by hand); the waits it asks for."""
    out = []
    for keys in batches:
        linger._last -= every_s
        out.append(linger.after(keys, full))
    return out


def test_a_lone_text_at_low_load_goes_at_once() -> None:
    linger = Linger(0.005)
    waits = feed(linger, [[f"t{i}"] for i in range(50)], every_s=0.010)  # 100 texts/s: one per 10 ms
    assert waits == [0.0] * 50 and linger.rate == pytest.approx(100, rel=0.05)


def test_under_load_batches_wait_to_fill_unless_full() -> None:
    linger = Linger(0.005)
    waits = feed(linger, [[f"t{i}", f"u{i}"] for i in range(50)], every_s=0.004)  # 500 texts/s
    assert waits[-1] == 0.005
    assert feed(linger, [["x", "y"]], every_s=0.004, full=True) == [0.0]  # a full batch: more are waiting


def test_votes_on_the_same_text_do_not_look_like_load() -> None:
    """Three voters' votes on each text, in three messages a millisecond apart, 100 texts/s: 300 messages/s,
    but only 100 texts/s, so the arbiter does not wait."""
    linger = Linger(0.005)
    waits = []
    for i in range(50):
        waits += feed(linger, [[f"t{i}"]], every_s=0.008) + feed(linger, [[f"t{i}"], [f"t{i}"]], every_s=0.001)
    assert max(waits) == 0.0


def test_no_wait_when_waiting_is_off() -> None:
    linger = Linger(0.0)
    assert feed(linger, [[f"t{i}" for i in range(100)] for _ in range(5)], every_s=0.001) == [0.0] * 5


def test_a_large_batch_does_not_wait() -> None:
    linger = Linger(0.005)
    feed(linger, [[f"t{i}", f"u{i}"] for i in range(50)], every_s=0.004)
    assert feed(linger, [[f"big{j}" for j in range(Linger.ENOUGH)]], every_s=0.004) == [0.0]


def test_one_client_waiting_for_each_answer_never_makes_it_wait() -> None:
    """A client that sends its next text when the last one is answered (~5 ms apart, ~200 texts/s): one text
    per wait is all that could come, and it comes only after the answer, so waiting would only delay it. With
    the old threshold (one text expected per wait) this regime lingered on and off and raised the p95."""
    linger = Linger(0.005)
    waits = feed(linger, [[f"t{i}"] for i in range(200)], every_s=0.0045)  # 222 texts/s
    assert max(waits) == 0.0 and linger.rate * linger.max_wait_s > 1.0  # over one text expected, still no wait


def test_it_waits_once_two_texts_are_expected() -> None:
    linger = Linger(0.005)
    assert feed(linger, [[f"t{i}"] for i in range(200)], every_s=0.002)[-1] == 0.005  # 500 texts/s
