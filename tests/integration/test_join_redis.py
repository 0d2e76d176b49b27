"""The arbiter's join in Redis (and in memory): two arbiter instances, each text claimed for decision exactly once;
a claim is a lease that only `confirm` (after the decision is published) makes final."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from flockwatch.arbiter.join import JoinStore, MemoryJoinStore, RedisJoinStore
from flockwatch.common.events import Vote

URL = "redis://127.0.0.1:6379/9"
LEASE_S = 0.3


def vote(text_id: str, voter: str) -> Vote:
    return Vote(
        message_id=Vote.id_for(text_id, voter),
        text_id=text_id,
        voter=voter,
        model_version="1",
        probabilities={"a": 0.5, "b": 0.5},
        latency_ms=0.0,
    )


@pytest.fixture
async def two_arbiters() -> AsyncIterator[tuple[JoinStore, JoinStore]]:
    prefix = f"fw:test:{uuid.uuid4().hex[:8]}:"
    a, b = RedisJoinStore(URL, prefix), RedisJoinStore(URL, prefix)
    yield a, b
    await a.redis.delete(*[k async for k in a.redis.scan_iter(f"{prefix}*")] or ["none"])
    await a.close()
    await b.close()


async def test_votes_split_across_two_arbiters_complete_exactly_once(two_arbiters: tuple[JoinStore, JoinStore]) -> None:
    a, b = two_arbiters
    ids = [f"t{i}" for i in range(200)]
    await a.add_texts([(i, time.time()) for i in ids[:100]], 5.0)
    await b.add_texts([(i, time.time()) for i in ids[100:]], 5.0)
    # the three votes of each text arrive at whichever instance, concurrently
    results = await asyncio.gather(
        *(
            store.add_votes([vote(i, voter)], expected=3, deadline_s=5.0)
            for i in ids
            for voter, store in zip(("x", "y", "z"), (a, b, a if hash(i) % 2 else b), strict=True)
        )
    )
    claimed = [r.text_id for batch in results for r in batch]
    assert sorted(claimed) == sorted(ids)
    assert all(len(r.votes) == 3 for batch in results for r in batch)
    assert await a.pop_expired(time.time() + 10) == [] and await b.pop_expired(time.time() + 10) == []


async def test_deadline_claims_a_text_once_with_the_votes_that_arrived(
    two_arbiters: tuple[JoinStore, JoinStore],
) -> None:
    a, b = two_arbiters
    now = time.time()
    await a.add_texts([("late", now)], 0.05)
    await b.add_votes([vote("late", "x")], expected=3, deadline_s=0.05)
    first, second = await asyncio.gather(a.pop_expired(now + 1), b.pop_expired(now + 1))
    ready = first + second
    assert [r.text_id for r in ready] == ["late"]
    assert [v.voter for v in ready[0].votes] == ["x"] and ready[0].submitted_at == pytest.approx(now)
    assert await a.add_votes([vote("late", "y"), vote("late", "z")], expected=3, deadline_s=1) == []


async def test_memory_join_decides_once_and_ignores_late_votes() -> None:
    store = MemoryJoinStore()
    await store.add_texts([("t", time.time())], 0.01)
    assert await store.add_votes([vote("t", "x")], 2, 0.01) == []
    ready = await store.add_votes([vote("t", "y"), vote("t", "y")], 2, 0.01)
    assert [r.text_id for r in ready] == ["t"]
    await store.confirm(["t"])
    assert await store.add_votes([vote("t", "z")], 2, 0.01) == []
    assert await store.pop_expired(time.time() + 3600) == []


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_reopened_text_waits_for_the_escalated_vote_then_its_new_deadline(
    backend: str, two_arbiters: tuple[JoinStore, JoinStore]
) -> None:
    store = MemoryJoinStore() if backend == "memory" else two_arbiters[0]
    now = time.time()
    await store.add_texts([("e", now, "is it spam?", {"language": "en"})], 5.0)
    [first] = await store.add_votes([vote("e", "x"), vote("e", "y")], expected=2, deadline_s=5.0)
    assert first.text == "is it spam?" and first.metadata == {"language": "en"} and not first.escalated
    await store.reopen(first, expected=3, deadline_s=0.2)
    assert await store.add_votes([vote("e", "x")], expected=2, deadline_s=5.0) == []  # a redelivery: still waits
    [final] = await store.add_votes([vote("e", "llm")], expected=2, deadline_s=5.0)
    assert final.escalated and sorted(v.voter for v in final.votes) == ["llm", "x", "y"]
    assert final.text == "is it spam?" and final.submitted_at == pytest.approx(now)
    await store.reopen(final, expected=4, deadline_s=0.05)  # nobody answers: the new deadline claims it once
    assert await store.pop_expired(time.time()) == []
    [late] = await store.pop_expired(time.time() + 1)
    assert late.escalated and await store.pop_expired(time.time() + 2) == []


@pytest.fixture(params=["memory", "redis"])
async def leased(request: pytest.FixtureRequest) -> AsyncIterator[tuple[JoinStore, JoinStore]]:
    """Two arbiter instances sharing join state, with a short lease: Redis, or one memory store seen twice."""
    if request.param == "memory":
        store = MemoryJoinStore(lease_s=LEASE_S)
        yield store, store
        return
    prefix = f"fw:test:{uuid.uuid4().hex[:8]}:"
    a, b = RedisJoinStore(URL, prefix, lease_s=LEASE_S), RedisJoinStore(URL, prefix, lease_s=LEASE_S)
    yield a, b
    await a.redis.delete(*[k async for k in a.redis.scan_iter(f"{prefix}*")] or ["none"])
    await a.close()
    await b.close()


async def test_an_unconfirmed_claim_is_claimed_again_after_its_lease_with_every_vote(
    leased: tuple[JoinStore, JoinStore],
) -> None:
    a, b = leased  # `a` claims the text, then dies before publishing
    now = time.time()
    await a.add_texts([("t", now, "hi", {"language": "en"})], 5.0)
    [claimed] = await a.add_votes([vote("t", "x"), vote("t", "y")], expected=2, deadline_s=5.0)
    assert sorted(v.voter for v in claimed.votes) == ["x", "y"]
    # the bus redelivers the votes, and a late voter answers: stored, but the lease holds
    assert await b.add_votes([vote("t", "x"), vote("t", "z")], expected=2, deadline_s=5.0) == []
    assert await b.pop_expired(time.time()) == []
    await asyncio.sleep(LEASE_S + 0.05)
    [again] = await b.pop_expired(time.time())
    assert sorted(v.voter for v in again.votes) == ["x", "y", "z"]
    assert again.text == "hi" and again.metadata == {"language": "en"} and again.submitted_at == pytest.approx(now)
    assert await a.pop_expired(time.time()) == []  # `b` holds the new lease
    await b.confirm(["t"])
    await asyncio.sleep(LEASE_S + 0.05)
    assert await a.pop_expired(time.time() + 3600) == [] and await b.pop_expired(time.time() + 3600) == []


async def test_a_confirmed_text_drops_later_votes_and_is_never_claimed_again(
    leased: tuple[JoinStore, JoinStore],
) -> None:
    a, b = leased
    await a.add_texts([("t", time.time())], 0.05)
    await a.add_votes([vote("t", "x")], expected=2, deadline_s=0.05)
    [claimed] = await b.pop_expired(time.time() + 1)
    assert [v.voter for v in claimed.votes] == ["x"]
    await b.confirm(["t"])
    await asyncio.sleep(LEASE_S + 0.05)
    assert await a.add_votes([vote("t", "x"), vote("t", "y")], expected=2, deadline_s=0.05) == []
    assert await a.pop_expired(time.time() + 3600) == [] and await b.pop_expired(time.time() + 3600) == []
    if isinstance(a, RedisJoinStore):  # the votes and the deadline are gone; only the mark stays
        keys = {k.decode() async for k in a.redis.scan_iter(f"{a.prefix}*")}
        assert keys == {f"{a.prefix}decided:t"}


async def test_a_redelivered_vote_after_the_lease_claims_the_complete_text_again(
    leased: tuple[JoinStore, JoinStore],
) -> None:
    a, b = leased
    await a.add_texts([("t", time.time())], 5.0)
    assert [r.text_id for r in await a.add_votes([vote("t", "x"), vote("t", "y")], 2, 5.0)] == ["t"]
    await asyncio.sleep(LEASE_S + 0.05)
    [again] = await b.add_votes([vote("t", "y")], expected=2, deadline_s=5.0)
    assert sorted(v.voter for v in again.votes) == ["x", "y"]


async def test_reopen_after_a_claim_clears_the_lease_and_keeps_votes_that_came_during_it(
    leased: tuple[JoinStore, JoinStore],
) -> None:
    a, b = leased
    await a.add_texts([("e", time.time(), "is it spam?")], 0.05)
    await a.add_votes([vote("e", "x")], expected=2, deadline_s=0.05)
    [first] = await a.pop_expired(time.time() + 1)  # decided on `x` alone: escalate
    assert await b.add_votes([vote("e", "y")], expected=2, deadline_s=0.05) == []  # late, during the lease
    await a.reopen(first, expected=2, deadline_s=5.0)  # `x` + the tier's `llm`, and `y` is kept
    assert await b.add_votes([vote("e", "x")], expected=2, deadline_s=5.0) == []  # a redelivery: waits for `llm`
    [final] = await b.add_votes([vote("e", "llm")], expected=2, deadline_s=5.0)
    assert final.escalated and sorted(v.voter for v in final.votes) == ["llm", "x", "y"]
    await b.confirm(["e"])
    assert await a.pop_expired(time.time() + 3600) == []


@pytest.mark.parametrize("kind", ["redis", "memory"])
async def test_pop_expired_tells_the_earliest_deadline_left(kind: str) -> None:
    """The deadline loop sleeps until the earliest deadline the store knows of (None: no text waits)."""
    prefix = f"fw:test:{uuid.uuid4().hex[:8]}:"
    store: JoinStore = RedisJoinStore(URL, prefix) if kind == "redis" else MemoryJoinStore()
    now = time.time()
    assert await store.pop_expired(now) == [] and store.next_deadline is None
    await store.add_texts([("soon", now)], 1.0)
    await store.add_texts([("later", now)], 5.0)
    assert await store.pop_expired(now) == []
    assert store.next_deadline == pytest.approx(now + 1.0, abs=0.05)
    [ready] = await store.pop_expired(now + 2)
    assert ready.text_id == "soon"
    await store.confirm(["soon"])
    assert store.next_deadline == pytest.approx(now + 5.0, abs=0.05)
    assert [r.text_id for r in await store.pop_expired(now + 6)] == ["later"]
    await store.confirm(["later"])
    await store.pop_expired(now + 3600)
    assert store.next_deadline is None
    await store.close()
