"""Times in query parameters: ISO 8601, or unix seconds, and one rule for numbers.

A number is always unix seconds, never milliseconds: pydantic's own datetime parsing reads any
number above 2e10 as milliseconds, so ``until=99999999999`` (the year 5138 in seconds) became
1973. Here a number is read as seconds up to the last second of the year 9999; beyond that it is
refused with a 422 that says to send seconds (a millisecond timestamp of today is 1.7e12).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final

from pydantic import BeforeValidator, WithJsonSchema

MAX_UNIX_SECONDS: Final = 253_402_300_799  # 9999-12-31T23:59:59Z, the last datetime there is
_NUMBER: Final = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")


def _unix_seconds(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a time is ISO 8601 or unix seconds, not a boolean")
    if isinstance(value, str) and _NUMBER.match(value):
        value = float(value)
    if isinstance(value, int | float):
        if not 0 <= value <= MAX_UNIX_SECONDS:
            hint = " (milliseconds? send seconds)" if value > MAX_UNIX_SECONDS else ""
            raise ValueError(
                f"{value} is not a time: unix seconds go from 0 to {MAX_UNIX_SECONDS}{hint}"
            )
        return datetime.fromtimestamp(value, UTC)
    return value


QueryTime = Annotated[
    datetime,
    BeforeValidator(_unix_seconds),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": MAX_UNIX_SECONDS},
                {"type": "string", "format": "date-time"},
            ]
        }
    ),
]
"""A point in time: ISO 8601 (no zone means UTC) or unix seconds (never milliseconds)."""
