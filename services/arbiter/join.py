"""Join state: the votes of each text until all expected voters arrived or its deadline passed.

One decision per text, even if an arbiter dies between claiming a text and publishing its decision: a
claim is a lease (`decided:<id>` = "lease", the text's deadline moved to the lease's end, its votes
kept); `confirm`, called once the decision is published, makes it final and drops the votes. A claim
nobody confirms is claimed again by `pop_expired` when its lease ends, with every vote stored so far
(decisions have deterministic ids, so consumers drop a second one). In memory for one process; in Redis
when several arbiter instances share the load (join state shared, claims atomic in Lua).
"""

from __future__ import annotations

import heapq
import json
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from flockwatch.common.events import Vote

CLAIM_TTL_S = 24 * 3600  # how long a confirmed text drops late votes
JOIN_TTL_S = 600
LEASE_S = 30.0  # a claim not confirmed within this is claimed again


@dataclass
class Ready:
    """A text claimed for decision: the votes that arrived, when it was submitted, its text, its stage."""

    text_id: str
    votes: list[Vote]
    submitted_at: float | None
    text: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    rounds: int = 0  # cascade tiers asked so far

    @property
    def escalated(self) -> bool:
        """A cascade tier was asked for this text."""
        return self.rounds > 0


class Submitted(NamedTuple):
    """A submitted text as the join store keeps it (text and metadata: for slices and escalation)."""

    text_id: str
    submitted_at: float
    text: str | None = None
    metadata: dict[str, str] | None = None


class JoinStore(ABC):
    """Collects votes per text and hands each text out for decision exactly once."""

    # the earliest deadline (epoch seconds) left after the last `pop_expired`, None when none was: the
    # deadline loop sleeps until then instead of asking on every tick
    next_deadline: float | None = None

    @abstractmethod
    async def add_texts(self, items: Sequence[tuple[Any, ...]], deadline_s: float) -> None:
        """Note submitted texts (`Submitted` fields: id, submission time, text, metadata); start their deadlines.

        A deadline runs from when the arbiter sees the text (or its first vote), not from its submission: under
        load the voters read the same backlog the arbiter does, and a clock started at submission would run out
        in the queue and decide texts without the votes on their way."""

    @abstractmethod
    async def reopen(self, item: Ready, expected: int, deadline_s: float) -> None:
        """Put a claimed text back one cascade round further: it waits for `expected` votes, or a new deadline."""

    @abstractmethod
    async def add_votes(self, votes: list[Vote], expected: int, deadline_s: float) -> list[Ready]:
        """Store votes; return the texts that now have every expected vote (claimed by this caller, leased)."""

    @abstractmethod
    async def pop_expired(self, now: float, limit: int = 1000) -> list[Ready]:
        """Claim texts whose deadline (or unconfirmed lease) passed."""

    @abstractmethod
    async def confirm(self, text_ids: Sequence[str]) -> None:
        """Mark claimed texts decided for good (their decisions are published): later votes are dropped."""

    async def close(self) -> None:  # noqa: B027 - optional: a store without connections has nothing to release
        """Release connections."""


@dataclass
class _Entry:
    votes: dict[str, Vote] = field(default_factory=dict)
    submitted_at: float | None = None
    text: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    expected: int | None = None  # set when escalated
    deadline: float = 0.0  # the live one: older heap items for this text are stale
    rounds: int = 0
    leased_until: float = 0.0  # claimed, not yet confirmed: nobody else claims it before then


class MemoryJoinStore(JoinStore):
    """One process: a dict of entries, a heap of deadlines, and a bounded memory of decided texts."""

    def __init__(self, remember: int = 200_000, lease_s: float = LEASE_S) -> None:
        self._entries: dict[str, _Entry] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._decided: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self.lease_s = lease_s

    def _entry(self, text_id: str, deadline: float) -> _Entry | None:
        if text_id in self._decided:
            return None
        entry = self._entries.get(text_id)
        if entry is None:
            entry = self._entries[text_id] = _Entry()
            self._schedule(text_id, entry, deadline)
        return entry

    def _schedule(self, text_id: str, entry: _Entry, deadline: float) -> None:
        entry.deadline = deadline
        heapq.heappush(self._deadlines, (deadline, text_id))

    def _claim(self, text_id: str, now: float) -> Ready:
        entry = self._entries[text_id]
        entry.leased_until = now + self.lease_s
        self._schedule(text_id, entry, entry.leased_until)
        votes = list(entry.votes.values())
        return Ready(text_id, votes, entry.submitted_at, entry.text, dict(entry.metadata), entry.rounds)

    async def add_texts(self, items: Sequence[tuple[Any, ...]], deadline_s: float) -> None:
        now = time.time()
        for item in items:
            sub = Submitted(*item)
            entry = self._entry(sub.text_id, max(sub.submitted_at, now) + deadline_s)
            if entry is not None:
                entry.submitted_at, entry.text, entry.metadata = sub.submitted_at, sub.text, sub.metadata or {}

    async def reopen(self, item: Ready, expected: int, deadline_s: float) -> None:
        self._decided.pop(item.text_id, None)
        votes = {v.voter: v for v in item.votes}
        old = self._entries.get(item.text_id)
        # votes stored during the claim's lease (not in `item`) stay, and the text waits for them too
        late = {k: v for k, v in old.votes.items() if k not in votes} if old else {}
        entry = _Entry(
            {**late, **votes}, item.submitted_at, item.text, item.metadata, expected + len(late), rounds=item.rounds + 1
        )
        self._entries[item.text_id] = entry
        self._schedule(item.text_id, entry, time.time() + deadline_s)

    async def add_votes(self, votes: list[Vote], expected: int, deadline_s: float) -> list[Ready]:
        ready: list[Ready] = []
        now = time.time()
        for vote in votes:
            entry = self._entry(vote.text_id, now + deadline_s)
            if entry is None:
                continue
            entry.votes[vote.voter] = vote
            if len(entry.votes) >= (entry.expected or expected) and entry.leased_until <= now:
                ready.append(self._claim(vote.text_id, now))
        return ready

    async def pop_expired(self, now: float, limit: int = 1000) -> list[Ready]:
        ready: list[Ready] = []
        while self._deadlines and self._deadlines[0][0] <= now and len(ready) < limit:
            deadline, text_id = heapq.heappop(self._deadlines)
            entry = self._entries.get(text_id)
            if entry is not None and deadline == entry.deadline:
                ready.append(self._claim(text_id, now))
        self.next_deadline = self._deadlines[0][0] if self._deadlines else None  # maybe stale: never later
        return ready

    async def confirm(self, text_ids: Sequence[str]) -> None:
        for text_id in text_ids:
            self._entries.pop(text_id, None)  # its heap items turn stale
            self._decided[text_id] = None
            if len(self._decided) > self._remember:
                self._decided.popitem(last=False)


# the votes in a join hash: its fields less text, submission time, metadata, expected count, rounds
_VOTES = """
local function votes(key)
  local n = redis.call('HLEN', key)
  for _, f in ipairs({'t', 'x', 'm', 'e', 'r'}) do n = n - redis.call('HEXISTS', key, f) end
  return n
end
"""

# A claim: the lease mark, the deadline moved to the lease's end, the hash kept (and its TTL renewed).
_CLAIM = """
local function claim(p, id, now, lease, ttl, out)
  if not redis.call('SET', p .. 'decided:' .. id, 'lease', 'NX', 'PX', lease) then return end
  local key = p .. 'join:' .. id
  redis.call('ZADD', p .. 'deadlines', now + lease, id)
  redis.call('EXPIRE', key, ttl)
  table.insert(out, id)
  table.insert(out, redis.call('HGETALL', key))
end
"""

# KEYS: none; ARGV: prefix, now_ms, deadline_ms, expected, ttl, lease_ms, then (text_id, voter, vote_json)*
_ADD_VOTES = (
    _VOTES
    + _CLAIM
    + """
local p, now, dl, expected = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl, lease = tonumber(ARGV[5]), tonumber(ARGV[6])
local out = {}
for i = 7, #ARGV, 3 do
  local id, voter, vote = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  -- a confirmed text drops the vote; during a lease it is stored for a re-decision
  if redis.call('GET', p .. 'decided:' .. id) ~= '1' then
    local key = p .. 'join:' .. id
    redis.call('HSET', key, 'v:' .. voter, vote)
    redis.call('EXPIRE', key, ttl)
    redis.call('ZADD', p .. 'deadlines', 'NX', now + dl, id)
    if votes(key) >= tonumber(redis.call('HGET', key, 'e') or expected) then claim(p, id, now, lease, ttl, out) end
  end
end
return out
"""
)

# ARGV: prefix, text_id, deadline_ms (absolute), ttl, expected, then (field, value)*
_REOPEN = (
    _VOTES
    + """
local p, id, dl, ttl, expected = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local key = p .. 'join:' .. id
redis.call('DEL', p .. 'decided:' .. id)
local given = 0
for i = 6, #ARGV, 2 do
  redis.call('HSET', key, ARGV[i], ARGV[i + 1])
  if string.sub(ARGV[i], 1, 2) == 'v:' then given = given + 1 end
end
-- votes stored during the claim's lease (not in the reopened item) stay, and the text waits for them too
redis.call('HSET', key, 'e', expected + votes(key) - given)
redis.call('EXPIRE', key, ttl)
redis.call('ZADD', p .. 'deadlines', dl, id)
return 1
"""
)

# ARGV: prefix, now_ms, limit, ttl, lease_ms
_POP_EXPIRED = (
    _CLAIM
    + """
local p, now, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl, lease = tonumber(ARGV[4]), tonumber(ARGV[5])
local ids = redis.call('ZRANGEBYSCORE', p .. 'deadlines', '-inf', now, 'LIMIT', 0, limit)
local out = {}
for _, id in ipairs(ids) do
  local mark = p .. 'decided:' .. id
  local state = redis.call('GET', mark)
  if not state then
    claim(p, id, now, lease, ttl, out)
  elseif state == 'lease' then
    -- our clock ran ahead of Redis's (PTTL may be 0 in the lease's last millisecond): wait for the lease
    redis.call('ZADD', p .. 'deadlines', now + math.max(redis.call('PTTL', mark), 1), id)
  else
    redis.call('ZREM', p .. 'deadlines', id)  -- confirmed
  end
end
local first = redis.call('ZRANGE', p .. 'deadlines', 0, 0, 'WITHSCORES')
return {out, first[2] or false}
"""
)

# ARGV: prefix, ttl, then (text_id, submitted_at, has_text, text, metadata_json, deadline_ms)*
# (one script call for a batch of texts: as a pipeline it was five commands per text, each packed by the client)
_ADD_TEXTS = """
local p, ttl = ARGV[1], tonumber(ARGV[2])
for i = 3, #ARGV, 6 do
  local id = ARGV[i]
  local key = p .. 'join:' .. id
  redis.call('HSETNX', key, 't', ARGV[i + 1])
  if ARGV[i + 2] == '1' then
    redis.call('HSETNX', key, 'x', ARGV[i + 3])
    redis.call('HSETNX', key, 'm', ARGV[i + 4])
  end
  redis.call('EXPIRE', key, ttl)
  redis.call('ZADD', p .. 'deadlines', 'NX', ARGV[i + 5], id)
end
return (#ARGV - 2) / 6
"""

# ARGV: prefix, claim_ttl, then text_id*
_CONFIRM = """
local p, claim_ttl = ARGV[1], tonumber(ARGV[2])
for i = 3, #ARGV do
  redis.call('SET', p .. 'decided:' .. ARGV[i], '1', 'EX', claim_ttl)
  redis.call('DEL', p .. 'join:' .. ARGV[i])
  redis.call('ZREM', p .. 'deadlines', ARGV[i])
end
return #ARGV - 2
"""


class RedisJoinStore(JoinStore):
    """Join state in Redis so that several arbiter instances share one topic's load; Lua keeps it atomic."""

    def __init__(self, url: str, prefix: str = "fw:arbiter:", lease_s: float = LEASE_S) -> None:
        import redis.asyncio as aioredis

        # a blocking pool: bursts wait for a free connection instead of failing
        self.redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(url, max_connections=32))
        self.prefix = prefix
        self.lease_s = lease_s
        self._add = self.redis.register_script(_ADD_VOTES)
        self._add_texts = self.redis.register_script(_ADD_TEXTS)
        self._pop = self.redis.register_script(_POP_EXPIRED)
        self._reopen = self.redis.register_script(_REOPEN)
        self._confirm = self.redis.register_script(_CONFIRM)

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))

    async def add_texts(self, items: Sequence[tuple[Any, ...]], deadline_s: float) -> None:
        if not items:
            return
        now = time.time()
        args: list[Any] = [self.prefix, JOIN_TTL_S]
        for item in items:
            sub = Submitted(*item)
            deadline_ms = int((max(sub.submitted_at, now) + deadline_s) * 1000)
            has_text = sub.text is not None
            args += [sub.text_id, repr(sub.submitted_at), int(has_text), sub.text if has_text else ""]
            args += [json.dumps(sub.metadata or {}) if has_text else "", deadline_ms]
        await self._add_texts(args=args)

    async def reopen(self, item: Ready, expected: int, deadline_s: float) -> None:
        fields: list[Any] = ["r", item.rounds + 1, "m", json.dumps(item.metadata)]
        fields += ["t", repr(item.submitted_at)] if item.submitted_at is not None else []
        fields += ["x", item.text] if item.text is not None else []
        for vote in item.votes:
            fields += [f"v:{vote.voter}", vote.model_dump_json()]
        deadline_ms = int((time.time() + deadline_s) * 1000)
        await self._reopen(args=[self.prefix, item.text_id, deadline_ms, JOIN_TTL_S, expected, *fields])

    async def add_votes(self, votes: list[Vote], expected: int, deadline_s: float) -> list[Ready]:
        args: list[Any] = [
            self.prefix,
            int(time.time() * 1000),
            int(deadline_s * 1000),
            expected,
            JOIN_TTL_S,
            self._lease_ms,
        ]
        sent: dict[bytes, Vote] = {}  # what this batch stores, by its JSON: such a vote need not be parsed back
        for vote in votes:
            raw = vote.model_dump_json().encode()
            sent[raw] = vote
            args += [vote.text_id, vote.voter, raw]
        return self._ready(await self._add(args=args), sent)

    async def pop_expired(self, now: float, limit: int = 1000) -> list[Ready]:
        flat, first = await self._pop(args=[self.prefix, int(now * 1000), limit, JOIN_TTL_S, self._lease_ms])
        self.next_deadline = float(first) / 1000 if first is not None else None
        return self._ready(flat)

    async def confirm(self, text_ids: Sequence[str]) -> None:
        if text_ids:
            await self._confirm(args=[self.prefix, CLAIM_TTL_S, *text_ids])

    @staticmethod
    def _ready(flat: list[Any], known: dict[bytes, Vote] | None = None) -> list[Ready]:
        ready, known = [], known or {}
        for text_id, fields in zip(flat[::2], flat[1::2], strict=True):
            pairs = dict(zip(fields[::2], fields[1::2], strict=True))
            t, text, meta, _, rounds = (pairs.pop(f, None) for f in (b"t", b"x", b"m", b"e", b"r"))
            votes = [known.get(v) or Vote.model_validate_json(v) for v in pairs.values()]
            ready.append(
                Ready(
                    text_id.decode(),
                    votes,
                    float(t) if t else None,
                    text.decode() if text is not None else None,
                    json.loads(meta) if meta else {},
                    int(rounds) if rounds is not None else 0,
                )
            )
        return ready

    async def close(self) -> None:
        await self.redis.aclose()
