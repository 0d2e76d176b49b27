"""A shim for one nats-py / FastStream mismatch that cost every NATS deployment a 30 s stall now and then.

nats-py 2.16's `PullSubscription.fetch` (`js/client.py`, `_fetch_n`) raises the builtin `asyncio.TimeoutError`
when its deadline runs out between the no-wait probe and the lingering pull request, and `nats.errors.TimeoutError`
(a subclass of it) everywhere else. FastStream's batch pull loop (`BatchPullStreamSubscriber._consume_pull`)
catches only `nats.errors.TimeoutError`, so the builtin one escaped the loop: the task was restarted, and the
messages of the partial batch it had already fetched were never handled nor acknowledged. JetStream redelivered
them only after the consumer's ack wait (30 s). On a loaded 2-core box this hit about one run in three of the
bus's poison test, and 2 of 8 requests over `flockwatch serve` (issue 23).

`patch_fetch_timeouts` makes `fetch` raise `nats.errors.TimeoutError` for both, so the loop ends the batch
normally and hands on what it fetched. It is idempotent and changes nothing else.
"""

from __future__ import annotations

import functools
from typing import Any

import nats.errors
from nats.js.client import JetStreamContext

MARK = "_flockwatch_timeouts"


def patch_fetch_timeouts() -> None:
    """Have `PullSubscription.fetch` raise only `nats.errors.TimeoutError` on a timeout (idempotent)."""
    cls: Any = JetStreamContext.PullSubscription
    if getattr(cls.fetch, MARK, False):
        return
    original = cls.fetch

    @functools.wraps(original)
    async def fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(self, *args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:  # the builtin one (asyncio.TimeoutError on 3.11+)
            raise nats.errors.TimeoutError from exc

    setattr(fetch, MARK, True)
    cls.fetch = fetch
