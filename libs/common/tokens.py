"""API tokens: a YAML file of hashed bearer tokens with scopes, and the store the HTTP APIs check them against.

A token is `fw_` + 43 URL-safe characters (256 random bits). Only its sha256 is kept: with that much
entropy a fast hash cannot be brute-forced, so a slow password hash would only cost every request time.
The file is a YAML list, one entry per token, so `flockwatch token create` can append to it:

    - name: ci-predict
      sha256: 5f1c…
      scopes: [predict]
      rate_limit: 100/minute     # optional; default FLOCKWATCH_RATE_LIMIT
      created: '2026-11-23T10:00:00+00:00'
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, get_args

import yaml
from limits import parse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

log = logging.getLogger(__name__)

Scope = Literal["predict", "feedback", "review", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
# what holding a scope grants besides itself: reviewers also post feedback (the review page does), admin all
IMPLIED: dict[Scope, frozenset[Scope]] = {
    "predict": frozenset(),
    "feedback": frozenset(),
    "review": frozenset({"feedback"}),
    "admin": frozenset(SCOPES),
}
PREFIX = "fw_"
HEADER = "# Flockwatch API tokens: sha256 hashes only, never the tokens (`flockwatch token create` appends).\n"


class TokenError(ValueError):
    """A token file that cannot be read, or a token request that cannot be honoured."""


def valid_rate(value: str | None) -> str | None:
    """A rate in the `limits` notation (`100/minute`, `10 per second`, `1000/hour;50/second`), or None."""
    if value is not None:
        try:
            parse(value)
        except ValueError as exc:
            raise ValueError(f"rate limit {value!r} is not like '100/minute' or '5/second'") from exc
    return value


class TokenEntry(BaseModel):
    """One token as the file keeps it: who, the hash, what it may do, how often."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 (hex) of the token.")
    scopes: frozenset[Scope] = Field(min_length=1)
    rate_limit: str | None = Field(None, description="This token's limit; default: FLOCKWATCH_RATE_LIMIT.")
    created: datetime | None = None

    _rate = field_validator("rate_limit")(valid_rate)

    def grants(self, scope: Scope) -> bool:
        """Whether this token may use `scope` (directly or through a broader scope)."""
        return any(scope == held or scope in IMPLIED[held] for held in self.scopes)


ENTRIES = TypeAdapter(list[TokenEntry])


def hash_token(token: str) -> str:
    """The sha256 (hex) under which a token is stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random token."""
    return PREFIX + secrets.token_urlsafe(32)


def read_tokens(path: Path) -> list[TokenEntry]:
    """Every entry of a token file (an empty file: none); TokenError naming the file and entry otherwise."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TokenError(f"{path}: cannot read the token file ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise TokenError(f"{path}: not valid YAML: {exc}") from exc
    try:
        entries = ENTRIES.validate_python(raw or [])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise TokenError(f"{path}: entry {where}: {first['msg']}") from exc
    names = [e.name for e in entries]
    if len(set(names)) < len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise TokenError(f"{path}: token names must be unique; repeated: {', '.join(repeated)}")
    return entries


def add_token(path: Path, name: str, scopes: list[Scope], rate_limit: str | None = None) -> str:
    """Create a token, append its hash to `path` (created with mode 0600), and return the token itself."""
    existing = read_tokens(path) if path.exists() else []
    if any(e.name == name for e in existing):
        raise TokenError(f"{path}: a token named {name!r} exists; revoke it first or choose another name")
    token = new_token()
    try:
        entry = TokenEntry(
            name=name,
            sha256=hash_token(token),
            scopes=frozenset(scopes),
            rate_limit=rate_limit,
            created=datetime.now(UTC).replace(microsecond=0),
        )
    except ValidationError as exc:
        raise TokenError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from exc
    text = yaml.safe_dump([_plain(entry)], sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(text if os.fstat(fd).st_size else HEADER + text)
    return token


def revoke_token(path: Path, name: str) -> None:
    """Remove the entry named `name` from the token file (rewritten atomically)."""
    entries = read_tokens(path)
    kept = [e for e in entries if e.name != name]
    if len(kept) == len(entries):
        raise TokenError(f"{path}: no token named {name!r}")
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        # no entries: the header alone (an empty YAML file), so that `add_token` can append again
        fh.write(HEADER + (yaml.safe_dump([_plain(e) for e in kept], sort_keys=False) if kept else ""))
    tmp.replace(path)


def _plain(entry: TokenEntry) -> dict[str, object]:
    data = entry.model_dump(mode="json", exclude_none=True)
    data["scopes"] = sorted(entry.scopes)
    return data


class TokenStore:
    """The tokens of a file, re-read when the file changes (checked at most every `recheck_s`), so a revoked
    token stops working without a restart. A file that turns unreadable keeps the last good tokens (logged)."""

    def __init__(self, path: Path, recheck_s: float = 1.0) -> None:
        self.path = path
        self.recheck_s = recheck_s
        self._by_hash = self._load()  # at start-up a bad file is an error, not a warning
        self._stamp = self._mtime()
        self._checked = time.monotonic()

    def _mtime(self) -> int | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def _load(self) -> dict[str, TokenEntry]:
        entries = read_tokens(self.path)
        if self.path.stat().st_mode & stat.S_IWOTH:  # readable is fine (hashes only); writable is a back door
            raise TokenError(f"{self.path}: every user may write it, so anyone could add a token; chmod o-w it")
        return {e.sha256: e for e in entries}

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.recheck_s:
            return
        self._checked = now
        stamp = self._mtime()
        if stamp == self._stamp:
            return
        try:
            self._by_hash = self._load()
        except TokenError as exc:
            log.error("auth: keeping the previous %d tokens: %s", len(self._by_hash), exc)
        self._stamp = stamp

    def find(self, token: str) -> TokenEntry | None:
        """The entry of a presented token, or None."""
        self._refresh()
        digest = hash_token(token)
        entry = self._by_hash.get(digest)
        # the dict lookup is on the hash of the secret; compare once more in constant time all the same
        return entry if entry is not None and hmac.compare_digest(entry.sha256, digest) else None

    def __len__(self) -> int:
        return len(self._by_hash)
