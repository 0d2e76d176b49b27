"""FastStream's binary message envelope for Redis Streams, written and read without FastStream's per-message
machinery.

The format is FastStream's own (`faststream.redis.parser.BinaryMessageFormatV1`): the identity header, the
format version, the offsets of the headers and of the body, the header count, each header as two
length-prefixed UTF-8 strings, then the body. FastStream's subscribers read what `encode` writes, and `parse`
reads what FastStream's publishers write; tests check both directions byte for byte. FastStream's encoder is
async and goes through a codec and a writer object per field, its parser through a reader object: together
~11 µs a message, the largest part of publishing a vote, against ~1 µs here. Anything that is not a
well-formed binary envelope (FastStream's older JSON envelope, a raw entry) goes to FastStream's own parser,
so what it accepts and how it falls back stays FastStream's.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Mapping

from faststream.redis.parser import BinaryMessageFormatV1

_MAGIC = BinaryMessageFormatV1.IDENTITY_HEADER
_VERSION = 1
_PREFIX = _MAGIC + struct.pack(">H", _VERSION)
_HEADERS_START = len(_PREFIX) + 8  # after the two 4-byte offsets
_OFFSETS = struct.Struct(">IIH")  # headers start, body start, header count
_SHORT = struct.Struct(">H")


def _field(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 0xFFFF:
        raise ValueError(f"a header of {len(raw)} bytes does not fit the envelope (at most 65,535)")
    return _SHORT.pack(len(raw)) + raw


def encode(body: bytes, correlation_id: str, headers: Mapping[str, str]) -> bytes:
    """An envelope around `body`; its headers in FastStream's order (the correlation id first, then `headers`)."""
    merged = {"correlation_id": correlation_id}
    merged.update(headers)
    fields = b"".join([_field(k) + _field(v) for k, v in merged.items()])
    offsets = _OFFSETS.pack(_HEADERS_START, _HEADERS_START + 2 + len(fields), len(merged))
    return b"".join((_PREFIX, offsets, fields, body))


def parse(data: bytes) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an entry, as FastStream's parser gives them."""
    if data[: len(_PREFIX)] == _PREFIX:
        try:
            headers_start, body_start, count = _OFFSETS.unpack_from(data, len(_PREFIX))
            if headers_start != _HEADERS_START:  # FastStream writes it there: reading it elsewhere is its job
                raise ValueError(headers_start)
            headers, at = {}, headers_start + 2
            for _ in range(count):
                (n,) = _SHORT.unpack_from(data, at)
                key = data[at + 2 : at + 2 + n].decode()
                at += 2 + n
                (n,) = _SHORT.unpack_from(data, at)
                headers[key] = data[at + 2 : at + 2 + n].decode()
                at += 2 + n
            return data[body_start:], headers
        except (struct.error, ValueError):  # UnicodeDecodeError is a ValueError
            pass
    body, headers = BinaryMessageFormatV1.parse(data)
    return bytes(body), headers


class CorrelationIds:
    """Unique correlation ids for published messages: a random per-process prefix and a counter (FastStream
    makes a uuid4 per message; nothing here reads them but FastStream's logging)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex() + "-"
        self._count = itertools.count()

    def next(self) -> str:
        """The next id."""
        return f"{self._prefix}{next(self._count):x}"
