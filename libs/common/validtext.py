"""Strings the HTTP APIs accept: valid Unicode (no lone surrogates, which JSON's `\\ud800` escape can smuggle in)
and no NUL, which Postgres cannot store. Checked at the edge, so the refusal is a 422 that says what is wrong
instead of a 500 from whatever encodes the string first."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, StrictStr


def check_text(value: str) -> str:
    """`value` unchanged if it is valid Unicode without NUL; else ValueError saying which character, and where."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"not valid Unicode: a lone surrogate U+{ord(value[exc.start]):04X} at character {exc.start} "
            "(a surrogate is only valid as half of a pair); send the text as UTF-8"
        ) from None
    nul = value.find("\x00")
    if nul >= 0:
        raise ValueError(f"contains a NUL character (U+0000) at character {nul}; NUL is not accepted in text")
    return value


ValidStr = Annotated[str, AfterValidator(check_text)]
ValidStrictStr = Annotated[StrictStr, AfterValidator(check_text)]
