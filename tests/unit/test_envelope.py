"""The Redis envelope codec against FastStream's own: the same bytes out, the same (body, headers) back."""

from __future__ import annotations

import asyncio

import pytest
from faststream.redis.parser import BinaryMessageFormatV1
from flockwatch.common import envelope

BODIES = [b"", b"{}", '{"text": "été — 鳥インフルエンザ"}'.encode(), b"x" * 70_000]
HEADERS = [
    {},
    {"content-type": "application/json"},
    {"content-type": "application/json", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    {"correlation_id": "theirs", "content-type": "application/json"},  # FastStream: the given one wins, in place
]


def faststream_encode(body: bytes, correlation_id: str, headers: dict[str, str]) -> bytes:
    return asyncio.run(
        BinaryMessageFormatV1.encode(message=body, reply_to=None, headers=headers, correlation_id=correlation_id)
    )


@pytest.mark.parametrize("headers", HEADERS)
@pytest.mark.parametrize("body", BODIES)
def test_encode_writes_faststreams_bytes_and_parse_reads_them_back(body: bytes, headers: dict[str, str]) -> None:
    theirs = faststream_encode(body, "c-1", headers)
    ours = envelope.encode(body, "c-1", headers)
    assert ours == theirs
    assert envelope.parse(theirs) == BinaryMessageFormatV1.parse(theirs) == (body, {"correlation_id": "c-1"} | headers)


@pytest.mark.parametrize(
    "data",
    [
        b"raw bytes, no envelope",
        b'{"data": "legacy JSON envelope", "headers": {"a": "b"}}',
        BinaryMessageFormatV1.IDENTITY_HEADER + b"\x00\x01\x00\x00",  # truncated
        BinaryMessageFormatV1.IDENTITY_HEADER + b"\x00\x02" + b"\x00" * 20,  # another format version
        envelope.encode(b"{}", "c", {"k": "v"})[:-5] + b"\xff\xfe",  # body bytes are not checked
        envelope.encode(b"{}", "c", {"k": "v"}).replace(b"\x00\x01v", b"\x00\x01\xff"),  # header not UTF-8
        envelope.encode(b"{}", "c", {"k": "v"}).replace(b"\x00\x01v", b"\x00\x09v"),  # header past the end
    ],
)
def test_anything_else_parses_as_faststream_parses_it(data: bytes) -> None:
    assert envelope.parse(data) == BinaryMessageFormatV1.parse(data)


def test_a_header_too_long_for_the_format_is_refused() -> None:
    with pytest.raises(ValueError, match="65,535"):
        envelope.encode(b"{}", "c", {"k": "v" * 70_000})


def test_correlation_ids_are_unique() -> None:
    a, b = envelope.CorrelationIds(), envelope.CorrelationIds()
    ids = [a.next() for _ in range(1000)] + [b.next() for _ in range(1000)]
    assert len(set(ids)) == 2000
