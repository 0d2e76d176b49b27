"""The AsyncAPI 3.0 document of the services' messages, generated with FastStream from the bus routes.

Each route becomes a typed Kafka subscriber (payload: the route's event model, group id: the route's group)
and each event type in a handler's return annotation a publisher on that type's topic. Kafka is the
production bus; the other transports carry the same topics and payloads.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import Any

from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI
from flockwatch.common.bus import Route
from flockwatch.common.events import DeadLetter, Event, TextSubmitted
from flockwatch.common.signing import HEADER as SIGNATURE_HEADER

TITLE = "Flockwatch"
SERVER = "kafka:9092"  # the broker of docker-compose.yml
DESCRIPTION = (
    "Messages between the Flockwatch services. Every message is JSON, keyed by its text id "
    "(the partitioning key); handlers consume in batches and drop repeated message ids."
)
# Published outside any bus handler: the gateway turns HTTP requests into texts, and the bus itself
# dead-letters what a route cannot decode or handle.
EXTRA_PUBLISHED: tuple[type[Event], ...] = (TextSubmitted, DeadLetter)
# Sections keyed by generated names: sorted so the document does not depend on registration order.
SORTED_SECTIONS = (("channels",), ("operations",), ("components", "messages"), ("components", "schemas"))


def published_types(handler: Callable[..., Any]) -> list[type[Event]]:
    """The event classes in a handler's return annotation: `list[Vote]` → [Vote]."""
    found: list[type[Event]] = []

    def walk(hint: Any) -> None:
        if isinstance(hint, type) and issubclass(hint, Event) and hasattr(hint, "TOPIC"):
            if hint not in found:
                found.append(hint)
            return
        for arg in typing.get_args(hint):
            walk(arg)

    walk(typing.get_type_hints(handler).get("return"))
    return found


def _consumer(route: Route[Any]) -> Callable[..., Any]:
    """A stand-in handler whose signature gives FastStream the route's payload type."""

    async def consume(msg: Any) -> None:
        return None

    consume.__annotations__ = {"msg": route.model, "return": None}
    consume.__name__ = f"{route.group}_{route.model.__name__}"
    return consume


def _describe(route: Route[Any]) -> str:
    doc = (route.handler.__doc__ or "").strip().splitlines()
    what = doc[0] if doc else f"Consumes {route.model.__name__}."
    fanout = " Broadcast: every instance gets every message (group id suffixed with the instance id)."
    return f"{route.group}: {what}{fanout if route.broadcast else ''}"


def _describe_event(event: type[Event]) -> str:
    doc = (event.__doc__ or "").strip().splitlines()
    return doc[0] if doc else event.__name__


def _add_group_ids(doc: dict[str, Any], groups: dict[str, str]) -> None:
    """FastStream leaves the Kafka operation binding's groupId out; the consumer group is part of the contract."""
    for key, group in groups.items():
        operation = doc["operations"][key]
        operation["bindings"] = {"kafka": {"groupId": {"type": "string", "enum": [group]}, "bindingVersion": "0.4.0"}}


def _sorted_sections(doc: dict[str, Any]) -> dict[str, Any]:
    for path in SORTED_SECTIONS:
        parent = doc
        for key in path[:-1]:
            parent = parent.get(key, {})
        if path[-1] in parent:
            parent[path[-1]] = dict(sorted(parent[path[-1]].items()))
    return doc


def _version() -> str:
    try:
        return dist_version("flockwatch")
    except PackageNotFoundError:
        return "0.0.0"


def build_asyncapi(routes: Iterable[Route[Any]]) -> dict[str, Any]:
    """The AsyncAPI 3.0 document (a JSON-ready dict, stable order) for these routes on a Kafka broker."""
    broker = KafkaBroker(SERVER, description="Kafka (KRaft) of docker-compose.yml; FLOCKWATCH_BUS_URL=kafka://…")
    published: dict[str, type[Event]] = {event.TOPIC: event for event in EXTRA_PUBLISHED}
    groups: dict[str, str] = {}
    for route in sorted(routes, key=lambda r: (r.topic, r.group)):
        title = f"{route.topic}:{route.group}"
        groups[title] = route.group
        broker.subscriber(
            route.topic,
            group_id=route.group,
            title=title,
            description=_describe(route),
        )(_consumer(route))
        for event in published_types(route.handler):
            published.setdefault(event.TOPIC, event)
    for topic, event in sorted(published.items()):
        broker.publisher(topic, schema=event, title=f"{topic}:{event.__name__}", description=_describe_event(event))
    spec = AsyncAPI(broker, title=TITLE, version=_version(), description=DESCRIPTION, schema_version="3.0.0")
    doc: dict[str, Any] = json.loads(json.dumps(spec.to_specification().to_jsonable()))
    _add_group_ids(doc, groups)
    _add_headers(doc)
    return _sorted_sections(doc)


# Message headers every transport carries (Kafka record headers, Redis Streams and NATS message headers).
HEADERS = {
    "type": "object",
    "properties": {
        "content-type": {"type": "string", "const": "application/json"},
        "traceparent": {
            "type": "string",
            "description": "W3C trace context of the span that sent the message (FLOCKWATCH_TRACING on): the "
            "consumer's span for the message is its child, so one text's messages form one trace.",
            "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        },
        "tracestate": {"type": "string", "description": "W3C trace state, when the trace has one."},
        SIGNATURE_HEADER: {
            "type": "string",
            "description": "With FLOCKWATCH_BUS_KEY set: the hex HMAC-SHA256 (that key) of the topic, a NUL byte and "
            "the payload. Every consumer dead-letters a message whose signature is missing or wrong, unread.",
            "pattern": "^[0-9a-f]{64}$",
        },
    },
}


def _add_headers(doc: dict[str, Any]) -> None:
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {})["MessageHeaders"] = HEADERS
    for message in components.get("messages", {}).values():
        message["headers"] = {"$ref": "#/components/schemas/MessageHeaders"}


def services_asyncapi() -> dict[str, Any]:
    """The document of every service (gateway, voters, arbiter), built on an in-memory bus: no I/O, no models."""
    # Imported here: the services depend on libs/common, not the other way round.
    from flockwatch.cli.runtime import ALL, build
    from flockwatch.gateway.app import Gateway
    from flockwatch.gateway.settings import GatewaySettings

    settings = GatewaySettings(_env_file=None, bus_url="memory://", state_url=None)
    bus, _ = build(ALL, settings)
    Gateway(settings, bus)  # the gateway's route is registered by its constructor (create_app in production)
    return build_asyncapi(bus.routes)


def render(doc: dict[str, Any]) -> str:
    """The document as the text written to docs/asyncapi.json."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


__all__ = ["build_asyncapi", "published_types", "render", "services_asyncapi"]
