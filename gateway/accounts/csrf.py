"""CSRF protection for cookie-authenticated changes: a synchronizer token per session.

Every browser session has its own random token (`browser_sessions.csrf_token`), given out at
login and by `GET /api/v1/auth/session`. A request that is authenticated by the session cookie
and changes anything (POST, PUT, PATCH, DELETE) must carry it, in one of two ways:

- the header `X-CSRF-Token: <token>` — for htmx put it once on the page,
  ``<body hx-headers='{"X-CSRF-Token": "{{ csrf_token }}"}'>``, and for fetch() in the header;
- a form field `csrf_token` in an ``application/x-www-form-urlencoded`` or
  ``multipart/form-data`` body — for plain HTML forms:
  ``<input type="hidden" name="csrf_token" value="{{ csrf_token }}">``.

Otherwise the answer is 403 `csrf_failed` and nothing changes. Requests authenticated by an
``Authorization`` header (API tokens, device JWTs) need no token: a browser never adds that
header to a forged cross-site request. The SameSite=Lax cookie is a second line, not the first.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from gateway.errors import Forbidden

HEADER = "X-CSRF-Token"
FORM_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


async def check(request: Request, expected: str) -> None:
    """Refuse an unsafe request whose CSRF token is missing or wrong (constant-time compare)."""
    if request.method in SAFE_METHODS:
        return
    given = request.headers.get(HEADER)
    if given is None and request.headers.get("content-type", "").startswith(_FORM_TYPES):
        form = await request.form()  # Starlette keeps it: the route reads the same form
        value = form.get(FORM_FIELD)
        given = value if isinstance(value, str) else None
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Forbidden(
            "csrf_failed",
            f"a change made with the session cookie needs the session's CSRF token in the "
            f"{HEADER} header or the {FORM_FIELD} form field (GET /api/v1/auth/session gives it)",
        )
