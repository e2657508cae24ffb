"""How every command prints: a table for people, one JSON document with --json, errors on stderr."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import IO, Any, NoReturn, TypeVar

from provisioning.device_input import UNSAFE_IN_TEXT


def safe(text: str) -> str:
    """`text` with every character a terminal would interpret written as a visible escape
    (ESC becomes ``\\x1b``): what machines reported is shown, never obeyed."""
    return UNSAFE_IN_TEXT.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class TerminalSafe:
    """A text stream that writes everything through `safe` (the operator commands print through
    it: device names, versions and error messages come from machines). `write_control` is for
    the CLI's own escape sequences (the live deployment view)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(safe(text))

    def write_control(self, sequence: str) -> int:
        return self._stream.write(sequence)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding, ...
        return getattr(self._stream, name)


def write_control(stream: IO[str], sequence: str) -> None:
    """Write the CLI's own control sequence, past `TerminalSafe` if the stream is one."""
    raw = getattr(stream, "write_control", None)
    if raw is not None:
        raw(sequence)
    else:
        stream.write(sequence)


T = TypeVar("T")


class CommandError(Exception):
    """An error to show the user (no traceback); exit code 1 unless given."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def fail(message: str, exit_code: int = 1) -> NoReturn:
    raise CommandError(message, exit_code)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def printed_as_json(args: argparse.Namespace, data: Any) -> bool:
    """With ``--json``, print `data` as one JSON document; whether it did."""
    if getattr(args, "json", False):
        print_json(data)
        return True
    return False


def ago(value: str | None, now: datetime | None = None) -> str:
    """'3m ago' for an ISO timestamp, '-' for none."""
    if not value:
        return "-"
    then = datetime.fromisoformat(value)
    seconds = int(((now or datetime.now(UTC)) - then).total_seconds())
    if seconds < 0:
        return "in " + span(-seconds)
    return span(seconds) + " ago"


def until(value: str | None, now: datetime | None = None) -> str:
    if not value:
        return "-"
    seconds = int((datetime.fromisoformat(value) - (now or datetime.now(UTC))).total_seconds())
    return "expired" if seconds <= 0 else "in " + span(seconds)


def span(seconds: int) -> str:
    """90 -> '1m', 7200 -> '2h': the largest whole unit."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def short_digest(digest: str) -> str:
    """A release digest as people read it: the first 12 hex digits."""
    return digest.removeprefix("sha256:")[:12]


def format_tags(tags: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(tags.items())) or "-"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def make_settings(cls: Callable[..., T], overrides: Mapping[str, Any]) -> T:
    """`cls(**overrides)` (a settings class), or the exit-2 error that names each bad setting.

    pydantic loads only here, when a command that needs settings runs."""
    from pydantic import ValidationError

    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CommandError(f"bad setting: {problems}", 2) from exc


def parse_duration(text: str) -> int:
    """'90s', '15m', '1h', '7d' or plain seconds -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        unit = units.get(text[-1:], 0)
        value = float(text[:-1]) * unit if unit else float(text)
    except ValueError:
        raise CommandError(f"not a duration: {text!r} (try 90s, 15m, 1h or 7d)") from None
    if value <= 0:
        raise CommandError(f"a duration must be positive, not {text!r}")
    return int(value)


def parse_tags(items: Sequence[str]) -> dict[str, str]:
    """['site=plant-3', 'line=A,shift=2'] -> {'site': 'plant-3', 'line': 'A', 'shift': '2'}."""
    tags: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise CommandError(f"a tag is KEY=VALUE, not {part!r}")
            tags[key.strip()] = value.strip()
    return tags
