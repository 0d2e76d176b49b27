"""Strings the HTTP APIs accept: valid Unicode (no lone surrogates, which JSON's `\\ud800` escape can smuggle in)
and no NUL, which Postgres cannot store. Checked at the edge, so the refusal is a 422 that says what is wrong
instead of a 500 from whatever encodes the string first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, GetJsonSchemaHandler, StrictStr
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema


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


# JSON-schema patterns, spelled the same in every regex dialect, of what the checks here and the gateway's
# non-space check refuse (a lone surrogate is no JSON string's content to a schema: only its escape can carry it)
NO_NUL = r"^[^\x00]*$"
# a character `str.strip()` keeps, NUL aside: the text has content
_CONTENT = r"[^\x00\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
NONSPACE_NO_NUL = rf"^[^\x00]*{_CONTENT}[^\x00]*$"


@dataclass(frozen=True)
class _Documented:
    """Adds a `pattern` to a string's JSON schema: the check's rule, documented; the check gives the message."""

    pattern: str

    def __get_pydantic_json_schema__(self, core: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema: dict[str, Any] = handler(core)
        return {**schema, "pattern": self.pattern}


ValidStr = Annotated[str, AfterValidator(check_text), _Documented(NO_NUL)]
ValidStrictStr = Annotated[StrictStr, AfterValidator(check_text), _Documented(NO_NUL)]
