"""Which model announcements (`ModelPublished`) a service acts on: the same three checks in every service, so
that no service moves to a version another refuses.

1. Origin: with `FLOCKWATCH_BUNDLE_KEY` set, the announcement carries an HMAC-SHA256 over its message id,
   component, version, path and manifest sha256 made with that key (the trainer, the registry and
   `flockwatch models rollback` sign). Hashes prove a bundle whole, not who made it: without a key, anyone who
   can write to the bus can announce a bundle, and a bundle's pickles run code when loaded.
2. Place: the bundle lies under a models root (symlinks resolved): the directory holding the versions of
   `FLOCKWATCH_MODEL_DIR` (`models/sms/current` → `models/sms`) or one of `FLOCKWATCH_MODEL_ROOTS`.
3. Content: its manifest is the one announced and every file matches it (`check_announced`).

A refused announcement is logged as an error and counted (`flockwatch_announcements_refused_total`); the
service keeps the bundle it runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from flockwatch.common import telemetry
from flockwatch.common.artifacts import MANIFEST, ArtifactError, check_announced
from flockwatch.common.events import ModelPublished
from flockwatch.common.settings import CommonSettings
from pydantic import SecretStr

log = logging.getLogger(__name__)
_warned = False  # the "no key" warning is said once per process, however many services it runs


class AnnouncementRefused(ArtifactError):
    """An announcement a service must not act on; `reason` is signature, outside or bundle."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _payload(msg: ModelPublished) -> bytes:
    # a JSON list: no field's value can run into the next one's
    fields = [msg.message_id, msg.component, msg.version, msg.path, msg.manifest_sha256]
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def signature(msg: ModelPublished, key: str) -> str:
    """The hex HMAC-SHA256 of an announcement's fields under `key`."""
    return hmac.new(key.encode("utf-8"), _payload(msg), hashlib.sha256).hexdigest()


def _secret(key: SecretStr | str | None) -> str | None:
    value = key.get_secret_value() if isinstance(key, SecretStr) else key
    return value or None  # an empty key (an unset variable in compose) is no key


def signed(msg: ModelPublished, key: SecretStr | str | None) -> ModelPublished:
    """The announcement with its signature under `key` (unchanged without a key)."""
    secret = _secret(key)
    return msg if secret is None else msg.model_copy(update={"signature": signature(msg, secret)})


def models_root(model_dir: Path) -> Path:
    """The directory holding the versions of the bundle `model_dir` names (a bundle, `current`, or a root)."""
    bundle = model_dir.name == "current" or (model_dir / MANIFEST).exists()
    return model_dir.resolve().parent if bundle else model_dir.resolve()


class Announcements:
    """One service's gate for `ModelPublished`: origin, place, content (see the module's docstring)."""

    def __init__(self, settings: CommonSettings, service: str) -> None:
        global _warned
        self.service = service
        self.key = _secret(settings.bundle_key)
        self.roots = [models_root(settings.model_dir), *(Path(r).resolve() for r in settings.model_roots)]
        if self.key is None and not _warned:
            _warned = True
            log.warning(
                "ANNOUNCEMENTS ARE UNSIGNED: no FLOCKWATCH_BUNDLE_KEY, so any bus writer can announce a model "
                "bundle under %s and the services load it. Fine on a laptop; set a key wherever the bus is shared.",
                ", ".join(map(str, self.roots)),
            )

    def check(self, msg: ModelPublished) -> Path:
        """The announced bundle's directory (symlinks resolved), or `AnnouncementRefused` saying why not."""
        if self.key is not None:
            if not msg.signature:
                raise AnnouncementRefused("signature", "unsigned, and FLOCKWATCH_BUNDLE_KEY is set")
            if not hmac.compare_digest(msg.signature, signature(msg, self.key)):
                raise AnnouncementRefused("signature", "wrong signature (not made with FLOCKWATCH_BUNDLE_KEY)")
        path = Path(msg.path).resolve()
        if not any(path != root and path.is_relative_to(root) for root in self.roots):
            roots = ", ".join(map(str, self.roots))
            raise AnnouncementRefused("outside", f"{path} is under no models root ({roots}; FLOCKWATCH_MODEL_ROOTS)")
        try:
            check_announced(path, msg.manifest_sha256)
        except (ArtifactError, OSError) as exc:
            raise AnnouncementRefused("bundle", str(exc)) from exc
        return path

    async def admit(self, msgs: Iterable[ModelPublished]) -> list[tuple[ModelPublished, Path]]:
        """The announcements that pass, each with its bundle's directory; the others logged and counted."""
        admitted = []
        for msg in msgs:
            try:
                path = await asyncio.to_thread(self.check, msg)
            except AnnouncementRefused as exc:
                telemetry.ANNOUNCEMENTS_REFUSED.labels(self.service, exc.reason).inc()
                log.error(
                    "%s: refused model %s (%s) from %s, announced as %s: %s",
                    self.service,
                    msg.version,
                    msg.component,
                    msg.path,
                    msg.message_id,
                    exc,
                )
                continue
            admitted.append((msg, path))
        return admitted
