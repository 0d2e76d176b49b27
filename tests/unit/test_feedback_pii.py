"""PII scrubbing rules: what is replaced, and what must survive (it carries the signal, or is not PII)."""

from __future__ import annotations

import pytest
from flockwatch.feedback.pii import looks_like_token, scrub

REPLACED = [
    # e-mail addresses, plain and obfuscated
    ("Mail me at john.doe+x@example.co.uk now", "Mail me at <EMAIL> now", "email"),
    ("contact: a_b-c@sub.mail-host.org.", "contact: <EMAIL>.", "email"),
    ("write to jane (at) example (dot) com", "write to <EMAIL>", "email"),
    ("jane[at]example[dot]co[dot]uk", "<EMAIL>", "email"),
    # phone numbers: UK, international, US
    ("Call me on 07700 900123 tonight", "Call me on <PHONE> tonight", "phone"),
    ("ring 07700900123", "ring <PHONE>", "phone"),
    ("or +44 7700 900123!", "or <PHONE>!", "phone"),
    ("+44 (0)20 7946 0018 office", "<PHONE> office", "phone"),
    ("landline 020 7946 0018", "landline <PHONE>", "phone"),
    ("US (555) 123-4567 ok", "US <PHONE> ok", "phone"),
    ("cell 555-123-4567", "cell <PHONE>", "phone"),
    ("cell 555.123.4567", "cell <PHONE>", "phone"),
    ("call 1-555-123-4567", "call <PHONE>", "phone"),
    ("+1 415 555 2671 is mine", "<PHONE> is mine", "phone"),
    ("+49 30 901820", "<PHONE>", "phone"),
    # secrets in URLs
    (
        "Reset: https://ex.com/reset?token=abc123DEF456ghi789&user=bob",
        "Reset: https://ex.com/reset?token=<SECRET>&user=bob",
        "url_secret",
    ),
    (
        "https://ex.com/cb#access_token=ya29a0AfH6SMBx&state=1",
        "https://ex.com/cb#access_token=<SECRET>&state=1",
        "url_secret",
    ),
    ("https://user:hunter2@example.com/path", "https://<SECRET>@example.com/path", "url_secret"),
    ("https://x.io/verify/9f86d081884c7d659a2feaa0c55ad015a3bf4f1b", "https://x.io/verify/<SECRET>", "url_secret"),
    ("https://x.io/r/123e4567-e89b-12d3-a456-426614174000 now", "https://x.io/r/<SECRET> now", "url_secret"),
    ("see https://ex.com/a?api_key=XYZ&page=2.", "see https://ex.com/a?api_key=<SECRET>&page=2.", "url_secret"),
    ("www.ex.com/login?session=s3ss10nT0k3nV4lu3xx", "www.ex.com/login?session=<SECRET>", "url_secret"),
    (
        "https://s3.amazonaws.com/b/k?X-Amz-Signature=abc&X-Amz-Expires=60",
        "https://s3.amazonaws.com/b/k?X-Amz-Signature=<SECRET>&X-Amz-Expires=60",
        "url_secret",
    ),
    ("https://ex.com/unsub?email=jo%40ex.com", "https://ex.com/unsub?email=<EMAIL>", "url_secret"),
    # other secrets
    ("password: hunter2 and more", "password: <SECRET> and more", "secret"),
    ("my pin is 4821", "my pin is <SECRET>", "secret"),
    ("api key=sk_live_abcdef", "api key=<SECRET>", "secret"),
    ("Authorization: Bearer abcDEF123456789xyz", "Authorization: Bearer <SECRET>", "secret"),
    ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "<SECRET>", "secret"),
    # cards (Luhn-valid), IBANs, IP addresses
    ("card 4111 1111 1111 1111 thanks", "card <CARD> thanks", "card"),
    ("card 4111-1111-1111-1111", "card <CARD>", "card"),
    ("IBAN GB82 WEST 1234 5698 7654 32", "IBAN <IBAN>", "iban"),
    ("DE89370400440532013000 is my account", "<IBAN> is my account", "iban"),
    ("server 192.168.1.10 is down", "server <IP> is down", "ip"),
    # names where a cue gives them away
    ("my name is sam and I like cats", "my name is <NAME> and I like cats", "name"),
    ("My name's Anna Lee.", "My name's <NAME>.", "name"),
    ("Hi John, are you coming?", "Hi <NAME>, are you coming?", "name"),
    ("hey Maria how r u", "hey <NAME> how r u", "name"),
    ("Dear Mrs Smith, your order", "Dear <NAME>, your order", "name"),
    ("Dr. Patel will call", "Dr. <NAME> will call", "name"),
    ("ask Mr O'Neil", "ask Mr <NAME>", "name"),
    ("I'm Sam. This is Alex speaking.", "I'm <NAME>. This is <NAME> speaking.", "name"),
    ("Hi, this is Priya from the bank", "Hi, this is <NAME> from the bank", "name"),
    ("Thanks, see you soon. Love, Anna x", "Thanks, see you soon. Love, <NAME> x", "name"),
    ("Kind regards,\nJohn Smith", "Kind regards,\n<NAME>", "name"),
    ("ok see you later - Tom", "ok see you later - <NAME>", "name"),
    ("Cheers, Bob!", "Cheers, <NAME>!", "name"),
]

KEPT = [
    # service numbers, short codes and prices: the spam signal, and not personal
    "WINNER!! call 09061701461 to claim your prize",
    "Or freephone 0800 123 4567 now",
    "call 08712300220 quoting claim code",
    "US toll-free 1-800-555-0199",
    "text WIN to 85069 now, costs 150p/msg",
    "£1000 cash or a £2,000 prize",
    # numbers that are not phone numbers
    "Meet on 2023-11-05 at 10:30",
    "order 1234567890123 ok",  # 13 digits, fails the Luhn check
    "pay 12.50 by 31/12/2024",
    "version 1.2.3 released",
    # URLs without secrets keep their exact form
    "see https://example.com/annual-report-2023 for more.",
    "https://ex.com/search?q=bird+flu&page=2",
    "www.gov.uk/bird-flu",
    # words after cues that are not names
    "Hi there, are you coming?",
    "Hi all, meeting moved",
    "I'm going home. I am tired",
    "I'm Sorry about that",
    "It's Monday!",
    "this is Important",
    "Dear Sir, we regret",
    "Thank God it's Friday",
    "the secret is out",
    "Love you lots",
    "ALL CAPS I'M SAM",  # capitalisation is the cue; all caps gives none
]


@pytest.mark.parametrize(("text", "expected", "kind"), REPLACED)
def test_pii_is_replaced_with_a_typed_placeholder(text: str, expected: str, kind: str) -> None:
    result = scrub(text)
    assert result.text == expected
    assert kind in result.found


@pytest.mark.parametrize("text", KEPT)
def test_text_without_pii_is_unchanged(text: str) -> None:
    result = scrub(text)
    assert result.text == text
    assert result.found == ()


def test_service_numbers_can_be_scrubbed_too() -> None:
    assert scrub("call 09061701461 now", keep_service_numbers=False).text == "call <PHONE> now"


def test_names_can_be_left_alone() -> None:
    assert scrub("Hi John, mail me at j@ex.com", names=False).text == "Hi John, mail me at <EMAIL>"


def test_several_kinds_in_one_text_are_all_reported() -> None:
    result = scrub("Hi Sam, call 07700 900123 or mail sam@ex.com; card 4111111111111111")
    assert result.text == "Hi <NAME>, call <PHONE> or mail <EMAIL>; card <CARD>"
    assert result.found == ("card", "email", "name", "phone")


def test_scrubbing_is_idempotent() -> None:
    once = scrub("Dear Anna, reset at https://ex.com/r?token=abc123def456ghi789 or call +44 7700 900123").text
    assert scrub(once).text == once


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("abc123DEF456ghi789", True),
        ("deadbeefdeadbeefdeadbeefdead", True),
        ("annual-report-2023", False),
        ("B08N5WRWNW", False),
        ("ilovebirdwatching", False),
    ],
)
def test_token_heuristic(value: str, token: bool) -> None:
    assert looks_like_token(value) is token
