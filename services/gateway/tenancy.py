"""Whose text is it: text ids are scoped to the caller's token, and one id names one content.

With auth on, a text travels on the bus as `<token name>/<text_id>`: token names and client ids hold no `/`,
so two tenants' ids never meet, and a tenant reads only its own decisions. With auth off (a laptop, one
tenant) the bus id is the client's id, as before.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from flockwatch.common.tokens import TokenEntry

MAX_BUS_ID = 128  # TextSubmitted.text_id's limit


def tenant_of(caller: TokenEntry | None) -> str | None:
    """The tenant a caller acts for: its token's name (None: auth is off)."""
    return caller.name if caller is not None else None


def bus_id(tenant: str | None, text_id: str) -> str:
    """The id a tenant's text travels under; a scoped id too long for the bus keeps a hash of the client's id
    (`~` marks it: client ids never hold one)."""
    if tenant is None:
        return text_id
    scoped = f"{tenant}/{text_id}"
    if len(scoped) <= MAX_BUS_ID:
        return scoped
    return f"{tenant}/~{hashlib.sha256(text_id.encode()).hexdigest()[:48]}"


def tenant_of_id(text_id: str) -> str | None:
    """The tenant of a bus id (None: an unscoped id, auth off)."""
    head, sep, _ = text_id.partition("/")
    return head if sep else None


class Claims:
    """The content (hash of text and metadata) each recent text id was first used for. A text id names one
    text: the pipeline decides an id once, so a different text under a used id would wait for a decision that
    never comes, or be answered (and cached) with the first text's. Bounded like the decision book."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._content: OrderedDict[str, str] = OrderedDict()

    def conflicts(self, text_id: str, content: str) -> bool:
        """Whether `text_id` was used for other content."""
        known = self._content.get(text_id)
        return known is not None and known != content

    def claim(self, text_id: str, content: str) -> None:
        """Remember `text_id` as naming `content` (a first use; a repeat of the same content is a retry)."""
        if text_id not in self._content:
            self._content[text_id] = content
            while len(self._content) > self.keep:
                self._content.popitem(last=False)
