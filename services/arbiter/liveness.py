"""Which first-stage voters the arbiter waits for, and how far behind it they are."""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)


class VoterWatch:
    """Liveness and lag of the voters, as the arbiter sees them.

    Down: a voter that has cast no vote since a text the arbiter saw at least `silence_s` ago is down (or hung);
    texts stop waiting for it until its next vote. While no texts come, silence proves nothing.

    Behind: a voter's lag is how long ago the freshest text it just voted on was submitted; the arbiter's own
    lag is the same for the texts it reads. When the live voters are (by their median) further behind than the
    arbiter, deadlines wait that much longer (at most `max_extra_s`): under load the voters read a backlog the
    arbiter has already read, and their votes are on the way. One slow voter does not move the median, so the
    deadline still decides without it — unless it is still on its way to the newest text the arbiter read
    (below): then its votes are coming, and the deadline waits for them too (capped alike).

    A voter that has not yet voted on the newest text the arbiter read (by submission time) is still working
    through that backlog: its lag grows with the clock until its next vote, instead of standing at what it was
    when it last voted. A burst (one 1,000-text batch) thus keeps its tail waiting while the voters are on their
    way to it, however long one of their batches takes, and stops as soon as they have caught up."""

    def __init__(
        self,
        silence_s: float,
        max_extra_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.silence_s = silence_s
        self.max_extra_s = max_extra_s
        self.clock = clock
        self.wall = wall  # submission times are epoch seconds
        self._newest_seen: float | None = None  # the newest submission time among the texts the arbiter read
        self._reached: dict[str, float] = {}  # per voter: the newest submission time it voted on
        self._last_vote: dict[str, float] = {}
        self._lag: dict[str, float] = {}
        self._own_lag = 0.0
        self._arrivals: deque[float] = deque()  # when batches of texts came; [0] is the newest old enough to judge
        self._down: set[str] = set()

    def saw_texts(self, lag_s: float, newest: float | None = None) -> None:
        """Texts arrived now; the freshest was submitted `lag_s` ago (at `newest`, epoch seconds)."""
        self._arrivals.append(self.clock())
        self._own_lag = max(0.0, lag_s)
        if newest is not None:
            self._newest_seen = max(newest, self._newest_seen or newest)

    def saw_votes(self, lags_s: dict[str, float], reached: dict[str, float] | None = None) -> None:
        """These voters voted now; the freshest text each voted on was submitted this long ago (at `reached`)."""
        now = self.clock()
        for voter, lag in lags_s.items():
            self._last_vote[voter] = now
            self._lag[voter] = max(0.0, lag)
        for voter, at in (reached or {}).items():
            self._reached[voter] = max(at, self._reached.get(voter, at))

    def lag_s(self, voter: str) -> float:
        """How far behind `voter` is now: its lag at its last vote, or, while it has not reached the newest text
        the arbiter read, how long ago the newest text it did vote on was submitted."""
        lag = self._lag[voter]
        reached = self._reached.get(voter)
        if reached is not None and self._newest_seen is not None and reached < self._newest_seen:
            lag = max(lag, self.wall() - reached)
        return lag

    def live(self, voters: Sequence[str]) -> list[str]:
        """The voters to wait for: all of them, unless some have been silent since a text old enough to judge
        (and not all: with every voter silent the deadline decides, as before)."""
        horizon = self.clock() - self.silence_s
        while len(self._arrivals) > 1 and self._arrivals[1] <= horizon:
            self._arrivals.popleft()
        if not self._arrivals or self._arrivals[0] > horizon:
            return list(voters)
        since = self._arrivals[0]
        live = [v for v in voters if self._last_vote.get(v, float("-inf")) >= since]
        down = set(voters) - set(live) if live else set()
        if down != self._down:
            log.warning("arbiter: not waiting for voters silent %.1f s: %s", self.silence_s, sorted(down) or "none")
            self._down = down
        return live or list(voters)

    def extra_wait_s(self, voters: Sequence[str]) -> float:
        """How much longer deadlines wait beyond the arbiter's own lag, capped: the live voters' median lag, or
        the lag of a live voter still on its way to the newest text the arbiter read, whichever is longer.

        A voter on its way is working through texts the arbiter has read (it voted within the silence window,
        and its votes reach the newest text only later): its votes are coming. Within one burst a model's votes
        can trail its siblings' (two votes per text from one service, split across the arbiter's reads), so
        the median alone would decide the tail without it."""
        live = [v for v in self.live(voters) if v in self._lag]
        if not live:
            return 0.0
        lags = [self.lag_s(v) for v in live]
        coming = [lag for v, lag in zip(live, lags, strict=True) if self._on_its_way(v)]
        wait = max(statistics.median(lags), max(coming, default=0.0))
        return min(self.max_extra_s, max(0.0, wait - self._own_lag))

    def _on_its_way(self, voter: str) -> bool:
        reached = self._reached.get(voter)
        return reached is not None and self._newest_seen is not None and reached < self._newest_seen
