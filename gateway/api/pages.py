"""Cursor pagination over HTTP, the same on every list endpoint.

Ask with `?limit=N` (1..500, default 100) and `?cursor=...`; the body is the page (a JSON list),
and when more follow, the response carries `X-Next-Cursor: <cursor>` and a `Link: <...>;
rel="next"` header with the URL of the next page. No header: that was the last page.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Query, Request, Response

from gateway.pagination import DEFAULT_PAGE, MAX_PAGE, Page, PageRequest

NEXT_HEADER = "X-Next-Cursor"


def page_request(
    limit: Annotated[
        int, Query(ge=1, le=MAX_PAGE, description=f"Page size (at most {MAX_PAGE}).")
    ] = DEFAULT_PAGE,
    cursor: Annotated[
        str | None,
        Query(
            max_length=1000,
            description=f"Where the page starts: the {NEXT_HEADER} header of the page before.",
        ),
    ] = None,
) -> PageRequest:
    return PageRequest(limit, cursor)


PageDep = Annotated[PageRequest, Depends(page_request)]


def send_page(request: Request, response: Response, page: Page[Any]) -> None:
    """Put the next page's cursor on the response (nothing on the last page)."""
    if page.next_cursor is None:
        return
    response.headers[NEXT_HEADER] = page.next_cursor
    url = request.url.include_query_params(cursor=page.next_cursor)
    response.headers["Link"] = f'<{url}>; rel="next"'
