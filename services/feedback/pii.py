"""PII scrubbing: e-mails, phone numbers, cards, IBANs, IPs, secrets in URLs, and names where detectable.

Texts are scrubbed before they are stored; typed placeholders keep the text's shape (a classifier still sees
that there was an e-mail address). Business service numbers (UK 08x/09x premium and freephone, US toll-free
and 900 numbers) identify companies, not people, and are what spam detection relies on: they are kept unless
`keep_service_numbers=False`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote_plus, urlsplit, urlunsplit

EMAIL, PHONE, SECRET, NAME, CARD, IBAN, IP = "<EMAIL>", "<PHONE>", "<SECRET>", "<NAME>", "<CARD>", "<IBAN>", "<IP>"

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_EMAIL_OBFUSCATED = re.compile(
    r"(?<![\w.+-])[\w.+-]+\s*[\[({]\s*at\s*[\])}]\s*[A-Za-z0-9-]+(?:\s*[\[({]\s*dot\s*[\])}]\s*[A-Za-z0-9-]+)+",
    re.IGNORECASE,
)
_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"']+", re.IGNORECASE)
# query/fragment keys whose values are credentials (lower-cased, '-' and '_' dropped)
_SECRET_KEYS = frozenset(
    "token accesstoken refreshtoken idtoken authtoken key apikey secret clientsecret password passwd pass pwd "  # noqa: SIM905
    "auth authorization sig signature session sessionid sid code otp pin ticket jwt hash xamzsignature "
    "xamzcredential xamzsecuritytoken credential resettoken verify verification".split()
)
_RUN = re.compile(r"[A-Za-z0-9]{16,}")
_HEX = re.compile(r"\b[A-Fa-f0-9]{24,}\b")
_UUID = re.compile(r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b")
_JWT = re.compile(r"\beyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]{5,}")
_BEARER = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE)
_ASSIGNED_SECRET = re.compile(
    r"\b(password|passwd|pwd|passcode|pin|api[ _-]?key|secret|token|otp)(\s*(?:is|:|=)\s*)(?!<)([^\s,;&<]{3,})",
    re.IGNORECASE,
)
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")
_IP = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\d.])")
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,5}(?:[\s.-]?\d{2,5}){1,4}"  # +44 7700 900123, +1 (555) …
    r"|\(\d{2,5}\)[\s.-]?\d{3,4}[\s.-]?\d{3,4}"  # (555) 123-4567, (020) 7946 0018
    r"|0\d{2,4}[\s.-]?\d{3,4}[\s.-]?\d{3,4}"  # 07700 900123, 020 7946 0018
    r"|1[\s.-]\d{3}[\s.-]\d{3}[\s.-]\d{4}"  # 1-800-555-0199
    r"|\d{3}[\s.-]\d{3}[\s.-]\d{4}"  # 555-123-4567
    r")(?!\w)"
)
_SERVICE_NUMBER = re.compile(r"^(?:(?:0|44)[89]\d{7,9}|1?(?:800|888|877|866|855|844|833|900)\d{7})$")

# Names: the cue is case-insensitive, the name itself must be capitalised (except after "my name is").
_NAME = r"[A-Z](?:[a-z]+|'[A-Z][a-z]+)(?:-[A-Z][a-z]+)?"  # Sam, O'Neil, Mary-Jane
_FULL_NAME = rf"{_NAME}(?:[ ]{_NAME})?"
# Capitalised words that follow a cue without being names.
_NOT_NAMES = frozenset(
    "i a an the all everyone everybody there guys team folks sir madam mum mom dad babe baby love dear darling "  # noqa: SIM905
    "honey sweetie friend friends mate buddy customer user member winner sorry fine ok okay good great well here "
    "home back going not so very just also still now tired busy free sure glad happy sad late ready done on in "
    "at to from with afraid interested available again thanks thank yes no please hope god lord this that it "
    "what who how why when where you your we our they he she his her me my monday tuesday wednesday thursday "
    "friday saturday sunday january february march april may june july august september october november "
    "december christmas xmas easter today tomorrow tonight morning evening night weekend urgent important "
    "congratulations congrats".split()
)
_MY_NAME = re.compile(
    rf"((?i:\bmy name is|\bmy name's|\bname:)\s+)((?i:[a-z])[a-z]+(?:[-'][A-Za-z][a-z]+)?(?:[ ]{_NAME})?)\b"
)
_INTRO = re.compile(
    rf"((?i:\bi am|\bi'm|\bim|\bcall me)\s+)({_FULL_NAME})\b"
    rf"|((?i:\bthis is|\bit's|\bit is)\s+)({_FULL_NAME})(?=\s*(?:[,.!?]|$|(?i:here|speaking|calling|from)\b))"
)
_SALUTATION = re.compile(
    rf"((?i:\bdear|\bhi|\bhello|\bhey|\bhiya|\bmorning|\bevening|\bthanks|\bthank you),?\s+)({_FULL_NAME})\b"
)
_TITLE = re.compile(rf"(\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Madam)\.?\s+)({_FULL_NAME})\b")
_SIGN_OFF = re.compile(
    rf"((?i:regards|best regards|kind regards|best wishes|thanks|thank you|cheers|love|sincerely|yours|best|xoxo)"
    rf"\s*[,!.]?\s*[-–—]?\s*)({_FULL_NAME})(?=\s*[.!]?\s*(?i:x+)?\s*$)"
)
_DASH_SIGNATURE = re.compile(rf"(\s[-–—]\s?)({_FULL_NAME})(?=\s*$)")


@dataclass(frozen=True)
class Scrubbed:
    """A scrubbed text and the kinds of PII that were replaced."""

    text: str
    found: tuple[str, ...]


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def _luhn(number: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def looks_like_token(value: str) -> bool:
    """A credential-like string: a long letter-digit run, long hex, a UUID or a JWT."""
    for run in _RUN.findall(value):
        if sum(c.isdigit() for c in run) >= 2 and sum(c.isalpha() for c in run) >= 2:
            return True
    return bool(_HEX.search(value) or _UUID.search(value) or _JWT.search(value))


def _clean_query(query: str) -> str:
    out = []
    for part in query.split("&"):
        key, sep, value = part.partition("=")
        decoded = unquote_plus(value)
        if not sep:
            out.append(SECRET if looks_like_token(unquote_plus(key)) else part)
            continue
        secret_key = unquote_plus(key).lower().replace("-", "").replace("_", "") in _SECRET_KEYS
        if (value and secret_key) or looks_like_token(decoded):
            value = SECRET
        elif _EMAIL.search(decoded):
            value = EMAIL
        out.append(key + sep + value)
    return "&".join(out)


def _scrub_url(url: str) -> str:
    trail = ""
    while url and url[-1] in ".,;:!?)]}":  # sentence punctuation, not part of the URL
        url, trail = url[:-1], url[-1] + trail
    bare = not url.lower().startswith(("http://", "https://"))
    parts = urlsplit(("http://" + url) if bare else url)
    netloc = parts.netloc
    if "@" in netloc:  # user:password@host
        netloc = SECRET + "@" + netloc.rsplit("@", 1)[1]
    path = "/".join(SECRET if looks_like_token(seg) else seg for seg in parts.path.split("/"))
    query = _clean_query(parts.query) if parts.query else ""
    fragment = _clean_query(parts.fragment) if parts.fragment else ""
    if (netloc, path, query, fragment) == (parts.netloc, parts.path, parts.query, parts.fragment):
        return url + trail
    out = urlunsplit((parts.scheme, netloc, path, query, fragment))
    return (out.removeprefix("http://") if bare else out) + trail


def _assigned_secret(match: re.Match[str]) -> str:
    key, sep, value = match.groups()
    if sep.strip().lower() == "is" and value.isalpha():  # "the secret is out": prose, not a credential
        return match.group(0)
    return key + sep + SECRET


def _phone(match: re.Match[str], keep_service_numbers: bool) -> str:
    raw = match.group(0)
    digits = _digits(raw)
    if not 9 <= len(digits) <= 15:
        return raw
    if keep_service_numbers and _SERVICE_NUMBER.match(digits):
        return raw
    return PHONE


def _name(match: re.Match[str]) -> str:
    groups = [g for g in match.groups() if g is not None]
    lead, name = groups[0], groups[1]
    words = name.split()
    if words[0].lower() in _NOT_NAMES:
        return match.group(0)
    # keep a second word that is not a name ("Hi Sam Please call")
    tail = name[len(words[0]) :] if len(words) > 1 and words[1].lower() in _NOT_NAMES else ""
    return lead + NAME + tail


def scrub(text: str, *, keep_service_numbers: bool = True, names: bool = True) -> Scrubbed:
    """Replace the PII in `text` with typed placeholders; report which kinds were found."""
    found: set[str] = set()

    def sub(pattern: re.Pattern[str], kind: str, repl: Callable[[re.Match[str]], str] | str, s: str) -> str:
        def wrapped(m: re.Match[str]) -> str:
            out = repl(m) if callable(repl) else repl
            if out != m.group(0):
                found.add(kind)
            return out

        return pattern.sub(wrapped, s)

    def card(m: re.Match[str]) -> str:
        digits = _digits(m.group(0))
        return CARD if 13 <= len(digits) <= 19 and _luhn(digits) else m.group(0)

    s = sub(_URL, "url_secret", lambda m: _scrub_url(m.group(0)), text)
    s = sub(_JWT, "secret", SECRET, s)
    s = sub(_BEARER, "secret", lambda m: f"{m.group(1)} {SECRET}", s)
    s = sub(_ASSIGNED_SECRET, "secret", _assigned_secret, s)
    s = sub(_EMAIL, "email", EMAIL, s)
    s = sub(_EMAIL_OBFUSCATED, "email", EMAIL, s)
    s = sub(_CARD, "card", card, s)
    s = sub(_IBAN, "iban", IBAN, s)
    s = sub(_IP, "ip", IP, s)
    s = sub(_PHONE, "phone", lambda m: _phone(m, keep_service_numbers), s)
    if names:
        for pattern in (_MY_NAME, _INTRO, _SALUTATION, _TITLE, _SIGN_OFF, _DASH_SIGNATURE):
            s = sub(pattern, "name", _name, s)
    return Scrubbed(s, tuple(sorted(found)))
