"""The arbiter's view of its voters: who is down (silent while texts came) and how far behind the rest are."""

from __future__ import annotations

from flockwatch.arbiter.liveness import VoterWatch

VOTERS = ["regex", "tfidf_lr", "ws"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_voter_silent_since_an_old_enough_text_is_not_waited_for_until_it_votes_again() -> None:
    clock = Clock()
    watch = VoterWatch(silence_s=2.0, max_extra_s=3.0, clock=clock)
    watch.saw_texts(0.0)
    watch.saw_votes({"regex": 0.01, "tfidf_lr": 0.02})
    clock.now += 1.0
    assert watch.live(VOTERS) == VOTERS  # not silent long enough to judge
    clock.now += 1.5
    watch.saw_votes({"regex": 0.01, "tfidf_lr": 0.02})
    assert watch.live(VOTERS) == ["regex", "tfidf_lr"]  # ws cast nothing since a text 2.5 s old
    watch.saw_votes({"ws": 0.05})
    assert watch.live(VOTERS) == VOTERS


def test_silence_without_texts_proves_nothing_and_all_silent_means_wait_for_all() -> None:
    clock = Clock()
    watch = VoterWatch(silence_s=2.0, max_extra_s=3.0, clock=clock)
    clock.now += 60
    assert watch.live(VOTERS) == VOTERS  # no text came: nobody owed a vote
    watch.saw_texts(0.0)
    clock.now += 5
    assert watch.live(VOTERS) == VOTERS  # every voter silent: the deadline decides, as without the watch


def test_deadlines_wait_for_the_median_voter_lag_beyond_the_arbiters_own_capped() -> None:
    clock = Clock()
    watch = VoterWatch(silence_s=2.0, max_extra_s=3.0, clock=clock)
    watch.saw_texts(0.2)  # the arbiter reads texts submitted 0.2 s ago
    watch.saw_votes({"regex": 0.3, "tfidf_lr": 1.4, "ws": 1.2})
    assert abs(watch.extra_wait_s(VOTERS) - 1.0) < 1e-9  # median 1.2 − 0.2
    watch.saw_votes({"tfidf_lr": 60.0})  # one voter far behind does not move the median
    assert abs(watch.extra_wait_s(VOTERS) - 1.0) < 1e-9
    watch.saw_votes({"regex": 50.0, "ws": 40.0})
    assert watch.extra_wait_s(VOTERS) == 3.0  # capped
    watch.saw_texts(45.0)  # the arbiter is behind too: only the difference counts
    assert watch.extra_wait_s(["regex"]) == 3.0 and watch.extra_wait_s(["ws"]) == 0.0


def test_a_voter_still_working_through_a_burst_falls_further_behind_until_it_reaches_the_newest_text() -> None:
    clock, wall = Clock(), Clock()
    watch = VoterWatch(silence_s=2.0, max_extra_s=30.0, clock=clock, wall=wall)
    burst = wall.now  # a 1,000-text batch: submitted together, read by the arbiter at once
    watch.saw_texts(0.0, newest=burst + 0.001)
    watch.saw_votes(dict.fromkeys(VOTERS, 0.1), reached=dict.fromkeys(VOTERS, burst))  # the head of the burst
    wall.now += 0.1
    assert abs(watch.extra_wait_s(VOTERS) - 0.1) < 1e-9
    wall.now += 0.5  # no vote since: the voters are busy with their next batch, not idle
    assert abs(watch.extra_wait_s(VOTERS) - 0.6) < 1e-9
    watch.saw_votes(dict.fromkeys(VOTERS, 0.6), reached=dict.fromkeys(VOTERS, burst + 0.001))  # the tail
    wall.now += 5.0
    assert abs(watch.extra_wait_s(VOTERS) - 0.6) < 1e-9  # caught up: the lag stands at its last vote


def test_one_voter_trailing_the_others_through_a_burst_is_waited_for_though_the_median_caught_up() -> None:
    """Issue 19: in a 1,000-text batch the tfidf_svm votes of the tail reached the arbiter in a later read than
    their tfidf_lr siblings; the median (three voters caught up) let the deadline decide 208 texts without them."""
    FOUR = ["regex", "tfidf_lr", "tfidf_svm", "ws"]  # noqa: N806
    clock, wall = Clock(), Clock()
    watch = VoterWatch(silence_s=2.0, max_extra_s=3.0, clock=clock, wall=wall)
    burst = wall.now
    watch.saw_texts(0.0, newest=burst + 0.001)
    watch.saw_votes(dict.fromkeys(FOUR, 0.1), reached=dict.fromkeys(FOUR, burst))
    others = [v for v in FOUR if v != "tfidf_svm"]
    watch.saw_votes(dict.fromkeys(others, 0.1), reached=dict.fromkeys(others, burst + 0.001))  # the tail, but svm
    wall.now += 0.8
    assert abs(watch.extra_wait_s(FOUR) - 0.8) < 1e-9  # svm is still on its way: its votes are coming
    wall.now += 10.0
    assert watch.extra_wait_s(FOUR) == 3.0  # capped
    watch.saw_votes({"tfidf_svm": 0.1}, reached={"tfidf_svm": burst + 0.001})  # it arrives
    assert abs(watch.extra_wait_s(FOUR) - 0.1) < 1e-9
