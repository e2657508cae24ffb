"""Cursor (keyset) pagination for every list: pages stay correct while rows are added, and a page
deep in a long list costs as much as the first.

A cursor is opaque to clients: URL-safe base64 of the last row's sort key. The sort key ends in a
unique column, so no two rows share one. A cursor that does not decode is a clear 422.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar, cast

import sqlalchemy as sa
from sqlmodel import Session
from sqlmodel.sql.expression import SelectOfScalar

from gateway.errors import Invalid

T = TypeVar("T")
DEFAULT_PAGE = 100
MAX_PAGE = 500


@dataclass(frozen=True)
class PageRequest:
    limit: int = DEFAULT_PAGE
    cursor: str | None = None


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


@dataclass(frozen=True)
class SortKey:
    """A column to order by; `descending` for newest-first lists."""

    column: Any
    descending: bool = False


def _encode(values: Sequence[Any]) -> str:
    plain = [{"dt": v.isoformat()} if isinstance(v, datetime) else v for v in values]
    return base64.urlsafe_b64encode(json.dumps(plain).encode()).decode().rstrip("=")


def _decode(cursor: str, width: int) -> list[Any]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = json.loads(raw)
        if not isinstance(values, list) or len(values) != width:
            raise ValueError("wrong shape")
        return [
            datetime.fromisoformat(v["dt"]) if isinstance(v, dict) and "dt" in v else v
            for v in values
        ]
    except (ValueError, binascii.Error, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise Invalid(
            "bad_cursor", "this cursor is not one the gateway gave out (take it from X-Next-Cursor)"
        ) from exc


def _after(keys: Sequence[SortKey], values: Sequence[Any]) -> Any:
    """Rows strictly after `values` in the order `keys` (OR of AND-ed prefixes: portable)."""
    clauses = []
    for i, key in enumerate(keys):
        equal = [keys[j].column == values[j] for j in range(i)]
        step = key.column < values[i] if key.descending else key.column > values[i]
        clauses.append(sa.and_(*equal, step))
    return sa.or_(*clauses)


Q = TypeVar("Q")  # a select statement: SQLAlchemy Core or SQLModel


def keyset(query: Q, keys: Sequence[SortKey], page: PageRequest) -> Q:
    """`query` narrowed to the rows after the cursor, ordered by `keys`, one more than a page
    (the extra row tells whether another page follows); run it and hand the rows to `finish`."""
    narrowed: Any = query
    if page.cursor:
        narrowed = narrowed.where(_after(keys, _decode(page.cursor, len(keys))))
    order = [k.column.desc() if k.descending else k.column.asc() for k in keys]
    return cast(Q, narrowed.order_by(*order).limit(page.limit + 1))


def finish(rows: Sequence[T], page: PageRequest, key_of: Callable[[T], Sequence[Any]]) -> Page[T]:
    """The page from the rows a `keyset` query gave; `key_of(row)` is the row's sort key."""
    items = list(rows[: page.limit])
    more = len(rows) > page.limit
    return Page(items, _encode(key_of(items[-1])) if more and items else None)


def paginate(
    session: Session,
    query: SelectOfScalar[T],
    keys: Sequence[SortKey],
    page: PageRequest,
    key_of: Callable[[T], Sequence[Any]],
) -> Page[T]:
    """One page of an ORM `query` (see `keyset`)."""
    return finish(list(session.exec(keyset(query, keys, page))), page, key_of)


def page_of_list(items: Sequence[T], page: PageRequest, key_of: Callable[[T], Any]) -> Page[T]:
    """The same over an already sorted, bounded list (summaries built in Python)."""
    start = 0
    if page.cursor:
        (last,) = _decode(page.cursor, 1)
        keys = [key_of(item) for item in items]
        start = next((i + 1 for i, k in enumerate(keys) if k == last), len(items))
    chunk = list(items[start : start + page.limit])
    more = start + page.limit < len(items)
    return Page(chunk, _encode([key_of(chunk[-1])]) if more and chunk else None)
