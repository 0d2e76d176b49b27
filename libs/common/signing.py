"""Signed bus messages: with `FLOCKWATCH_BUS_KEY` set, every message a bus publishes carries an HMAC-SHA256 of
its topic and payload (header `fw-sig`), and every consumer dead-letters a message whose signature is missing
or wrong before it is parsed. Whoever can write to the broker but lacks the key can then forge no text, vote,
decision, correction or announcement: a forged vote would sway a decision, a forged decision would be served.

The key is one secret shared by every service, like `FLOCKWATCH_BUNDLE_KEY` (which, in addition, signs the
fields of a model announcement end to end). Without a key messages are neither signed nor checked.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping
from typing import Any

from pydantic import SecretStr

HEADER = "fw-sig"
log = logging.getLogger(__name__)
_warned = False


def key_bytes(key: SecretStr | str | None) -> bytes | None:
    """The key as bytes, or None when unset or empty (an unset variable in compose is no key)."""
    value = key.get_secret_value() if isinstance(key, SecretStr) else key
    return value.encode("utf-8") if value else None


def sign(key: bytes, topic: str, payload: bytes) -> str:
    """The hex HMAC-SHA256 of a message: its topic, a NUL, its payload."""
    return hmac.new(key, topic.encode("utf-8") + b"\0" + payload, hashlib.sha256).hexdigest()


def with_signature(key: bytes, topic: str, payload: bytes, headers: Mapping[str, str] | None) -> dict[str, str]:
    """The message's headers plus its signature."""
    return {**(headers or {}), HEADER: sign(key, topic, payload)}


def verified(key: bytes, topic: str, raw: Any, headers: Mapping[str, Any] | None) -> bool:
    """Whether a consumed message (raw body and headers as the transport hands them) carries a good signature."""
    given = (headers or {}).get(HEADER)
    if isinstance(given, bytes):
        given = given.decode("ascii", errors="replace")
    if not isinstance(given, str):
        return False
    if isinstance(raw, str):
        raw = raw.encode("utf-8", errors="surrogatepass")
    if not isinstance(raw, bytes | bytearray):
        return False  # a Redis entry with fields of its own, not written by a bus
    return hmac.compare_digest(given, sign(key, topic, bytes(raw)))


def warn_unsigned(scheme: str) -> None:
    """Say once per process that messages on a shared broker are not signed."""
    global _warned
    if scheme != "memory" and not _warned:
        _warned = True
        log.warning(
            "BUS MESSAGES ARE UNSIGNED: no FLOCKWATCH_BUS_KEY, so anyone who can write to the %s broker can inject "
            "texts, votes and decisions. Fine on a laptop; set a key wherever the broker is shared.",
            scheme,
        )
