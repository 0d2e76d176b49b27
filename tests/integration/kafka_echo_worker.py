"""A one-route worker process for the at-least-once test: an `echo` vote per submitted text, over Kafka.

`python -m tests.integration.kafka_echo_worker URL GROUP [--die-after-publishing PREFIX]`: with the flag, the
process exits (code 17) right after it has published the votes of the first batch holding a text whose id
starts with PREFIX: the votes are on the broker, the batch's offsets are not committed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Sequence
from typing import Any

from flockwatch.common import topics
from flockwatch.common.bus import Route, create_bus
from flockwatch.common.events import Event, TextSubmitted, Vote
from flockwatch.common.settings import CommonSettings

DIED = 17


def echo(msgs: list[TextSubmitted]) -> list[Event]:
    """One vote per text, with the deterministic vote id."""
    return [
        Vote(
            message_id=Vote.id_for(m.text_id, "echo"),
            text_id=m.text_id,
            voter="echo",
            model_version="1",
            probabilities={"a": 1.0},
            latency_ms=0.0,
        )
        for m in msgs
    ]


async def main(url: str, group: str, die_prefix: str | None) -> None:
    bus = create_bus(CommonSettings(bus_url=url, instance_id=group, _env_file=None))
    seen_prefix = False

    @bus.subscribe(topics.TEXT_SUBMITTED, TextSubmitted, group=group)
    async def vote(msgs: list[TextSubmitted]) -> list[Event]:
        nonlocal seen_prefix
        seen_prefix = seen_prefix or any(die_prefix and m.text_id.startswith(die_prefix) for m in msgs)
        return echo(msgs)

    dispatch = bus.dispatch

    async def dispatch_then_die(route: Route[Any], items: Sequence[Any], headers: Any = None, ack: Any = None) -> None:
        await dispatch(route, items, headers, ack)  # the handler ran and its votes were published (broker acknowledged)
        if seen_prefix:
            os._exit(DIED)  # ... and the process dies before FastStream commits the batch's offsets

    bus.dispatch = dispatch_then_die
    async with bus:
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("group")
    parser.add_argument("--die-after-publishing", dest="prefix", default=None)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.group, args.prefix))
