"""Join state: the votes of each text until all expected voters arrived or its deadline passed.

Exactly one instance decides each text: a claim (`decided`) taken atomically. In memory for one
process; in Redis when several arbiter instances share the load (join state shared, claims atomic).
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

CLAIM_TTL_S = 24 * 3600
JOIN_TTL_S = 600


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

    @abstractmethod
    async def add_texts(self, items: Sequence[tuple[Any, ...]], deadline_s: float) -> None:
        """Note submitted texts (`Submitted` fields: id, submission time, text, metadata); start their deadlines."""

    @abstractmethod
    async def reopen(self, item: Ready, expected: int, deadline_s: float) -> None:
        """Put a claimed text back one cascade round further: it waits for `expected` votes, or a new deadline."""

    @abstractmethod
    async def add_votes(self, votes: list[Vote], expected: int, deadline_s: float) -> list[Ready]:
        """Store votes; return the texts that now have every expected vote (claimed by this caller)."""

    @abstractmethod
    async def pop_expired(self, now: float, limit: int = 1000) -> list[Ready]:
        """Claim texts whose deadline passed."""

    async def close(self) -> None:
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


class MemoryJoinStore(JoinStore):
    """One process: a dict of entries, a heap of deadlines, and a bounded memory of decided texts."""

    def __init__(self, remember: int = 200_000) -> None:
        self._entries: dict[str, _Entry] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._decided: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    def _entry(self, text_id: str, deadline: float) -> _Entry | None:
        if text_id in self._decided:
            return None
        entry = self._entries.get(text_id)
        if entry is None:
            entry = self._entries[text_id] = _Entry(deadline=deadline)
            heapq.heappush(self._deadlines, (deadline, text_id))
        return entry

    def _claim(self, text_id: str) -> Ready:
        entry = self._entries.pop(text_id)
        self._decided[text_id] = None
        if len(self._decided) > self._remember:
            self._decided.popitem(last=False)
        votes = list(entry.votes.values())
        return Ready(text_id, votes, entry.submitted_at, entry.text, entry.metadata, entry.rounds)

    async def add_texts(self, items: Sequence[tuple[Any, ...]], deadline_s: float) -> None:
        for item in items:
            sub = Submitted(*item)
            entry = self._entry(sub.text_id, sub.submitted_at + deadline_s)
            if entry is not None:
                entry.submitted_at, entry.text, entry.metadata = sub.submitted_at, sub.text, sub.metadata or {}

    async def reopen(self, item: Ready, expected: int, deadline_s: float) -> None:
        self._decided.pop(item.text_id, None)
        votes = {v.voter: v for v in item.votes}
        deadline = time.time() + deadline_s
        self._entries[item.text_id] = _Entry(
            votes, item.submitted_at, item.text, item.metadata, expected, deadline, item.rounds + 1
        )
        heapq.heappush(self._deadlines, (deadline, item.text_id))

    async def add_votes(self, votes: list[Vote], expected: int, deadline_s: float) -> list[Ready]:
        ready: list[Ready] = []
        now = time.time()
        for vote in votes:
            entry = self._entry(vote.text_id, now + deadline_s)
            if entry is None:
                continue
            entry.votes[vote.voter] = vote
            if len(entry.votes) >= (entry.expected or expected):
                ready.append(self._claim(vote.text_id))
        return ready

    async def pop_expired(self, now: float, limit: int = 1000) -> list[Ready]:
        ready: list[Ready] = []
        while self._deadlines and self._deadlines[0][0] <= now and len(ready) < limit:
            deadline, text_id = heapq.heappop(self._deadlines)
            entry = self._entries.get(text_id)
            if entry is not None and deadline == entry.deadline:
                ready.append(self._claim(text_id))
        return ready


# KEYS: none; ARGV: prefix, now_ms, deadline_ms, expected, ttl, claim_ttl, then (text_id, voter, vote_json)*
_ADD_VOTES = """
local p, now, dl, expected = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl, claim_ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local out = {}
for i = 7, #ARGV, 3 do
  local id, voter, vote = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('EXISTS', p .. 'decided:' .. id) == 0 then
    local key = p .. 'join:' .. id
    redis.call('HSET', key, 'v:' .. voter, vote)
    redis.call('EXPIRE', key, ttl)
    redis.call('ZADD', p .. 'deadlines', 'NX', now + dl, id)
    local n = redis.call('HLEN', key)
    for _, f in ipairs({'t', 'x', 'm', 'e', 'r'}) do n = n - redis.call('HEXISTS', key, f) end
    local need = tonumber(redis.call('HGET', key, 'e') or expected)
    if n >= need and redis.call('SET', p .. 'decided:' .. id, '1', 'NX', 'EX', claim_ttl) then
      redis.call('ZREM', p .. 'deadlines', id)
      table.insert(out, id)
      table.insert(out, redis.call('HGETALL', key))
      redis.call('DEL', key)
    end
  end
end
return out
"""

# ARGV: prefix, text_id, deadline_ms (absolute), ttl, then (field, value)*
_REOPEN = """
local p, id, dl, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local key = p .. 'join:' .. id
redis.call('DEL', p .. 'decided:' .. id)
for i = 5, #ARGV, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', key, ttl)
redis.call('ZADD', p .. 'deadlines', dl, id)
return 1
"""

# ARGV: prefix, now_ms, limit, claim_ttl
_POP_EXPIRED = """
local p, now, limit, claim_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ids = redis.call('ZRANGEBYSCORE', p .. 'deadlines', '-inf', now, 'LIMIT', 0, limit)
local out = {}
for _, id in ipairs(ids) do
  if redis.call('ZREM', p .. 'deadlines', id) == 1
     and redis.call('SET', p .. 'decided:' .. id, '1', 'NX', 'EX', claim_ttl) then
    local key = p .. 'join:' .. id
    table.insert(out, id)
    table.insert(out, redis.call('HGETALL', key))
    redis.call('DEL', key)
  end
end
return out
"""


class RedisJoinStore(JoinStore):
    """Join state in Redis so that several arbiter instances share one topic's load; Lua keeps it atomic."""

    def __init__(self, url: str, prefix: str = "fw:arbiter:") -> None:
        import redis.asyncio as aioredis

        # a blocking pool: bursts wait for a free connection instead of failing
        self.redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(url, max_connections=32))
        self.prefix = prefix
        self._add = self.redis.register_script(_ADD_VOTES)
        self._pop = self.redis.register_script(_POP_EXPIRED)
        self._reopen = self.redis.register_script(_REOPEN)

    async def add_texts(self, items: Sequence[tuple[Any, ...]], deadline_s: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for item in items:
            sub = Submitted(*item)
            key = f"{self.prefix}join:{sub.text_id}"
            pipe.hsetnx(key, "t", repr(sub.submitted_at))
            if sub.text is not None:
                pipe.hsetnx(key, "x", sub.text)
                pipe.hsetnx(key, "m", json.dumps(sub.metadata or {}))
            pipe.expire(key, JOIN_TTL_S)
            pipe.zadd(f"{self.prefix}deadlines", {sub.text_id: int((sub.submitted_at + deadline_s) * 1000)}, nx=True)
        await pipe.execute()

    async def reopen(self, item: Ready, expected: int, deadline_s: float) -> None:
        fields: list[Any] = ["e", expected, "r", item.rounds + 1, "m", json.dumps(item.metadata)]
        fields += ["t", repr(item.submitted_at)] if item.submitted_at is not None else []
        fields += ["x", item.text] if item.text is not None else []
        for vote in item.votes:
            fields += [f"v:{vote.voter}", vote.model_dump_json()]
        deadline_ms = int((time.time() + deadline_s) * 1000)
        await self._reopen(args=[self.prefix, item.text_id, deadline_ms, JOIN_TTL_S, *fields])

    async def add_votes(self, votes: list[Vote], expected: int, deadline_s: float) -> list[Ready]:
        args: list[Any] = [
            self.prefix,
            int(time.time() * 1000),
            int(deadline_s * 1000),
            expected,
            JOIN_TTL_S,
            CLAIM_TTL_S,
        ]
        for vote in votes:
            args += [vote.text_id, vote.voter, vote.model_dump_json()]
        return self._ready(await self._add(args=args))

    async def pop_expired(self, now: float, limit: int = 1000) -> list[Ready]:
        return self._ready(await self._pop(args=[self.prefix, int(now * 1000), limit, CLAIM_TTL_S]))

    @staticmethod
    def _ready(flat: list[Any]) -> list[Ready]:
        ready = []
        for text_id, fields in zip(flat[::2], flat[1::2], strict=True):
            pairs = dict(zip(fields[::2], fields[1::2], strict=True))
            t, text, meta, _, rounds = (pairs.pop(f, None) for f in (b"t", b"x", b"m", b"e", b"r"))
            votes = [Vote.model_validate_json(v) for v in pairs.values()]
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
