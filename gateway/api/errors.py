"""Error bodies and request-size limits shared by every route.

Every error the API sends has one shape, `ErrorBody` (``{detail, reason}``, and for a request that
fails validation ``errors``: where and what, never the value that was sent, so a 422 does not
echo a megabyte back or reflect what an attacker put in). The OpenAPI document says so for every
status it lists (each router's ``responses``).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api.early_answer import EarlyAnswer, answer
from gateway.errors import GatewayError
from provisioning.wire import ErrorBody

log = logging.getLogger(__name__)
MAX_LISTED_ERRORS = 10


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {
            "loc": [str(part) for part in error.get("loc", ())],
            "msg": str(error.get("msg", ""))[:300],
            "type": str(error.get("type", "")),
        }
        for error in exc.errors()[:MAX_LISTED_ERRORS]
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(_request: Request, exc: GatewayError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        headers = getattr(exc, "headers", None) or headers  # e.g. Retry-After on 429
        return JSONResponse(
            {"detail": exc.detail, "reason": exc.reason}, status_code=exc.status, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(exc)
        if any(error["type"] == "json_invalid" for error in errors):
            detail, reason = "the request body is not valid JSON", "malformed_json"
        else:
            first = errors[0] if errors else {"loc": [], "msg": "invalid"}
            where = ".".join(first["loc"]) or "request"
            detail, reason = f"{where}: {first['msg']}", "invalid_request"
            if len(exc.errors()) > 1:
                detail += f" (and {len(exc.errors()) - 1} more)"
        body = ErrorBody(detail=detail, reason=reason, errors=errors)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        status, reason, detail = exc.status_code, f"http_{exc.status_code}", str(exc.detail)
        if status == 400:  # FastAPI could not decode the body at all (not UTF-8, say)
            status, reason = 422, "malformed_json"
            detail = "the request body is not valid JSON in UTF-8"
        elif status == 404:
            reason = "not_found"
        elif status == 405:
            reason = "method_not_allowed"
            headers["Allow"] = ", ".join(_methods_of(request))
        return JSONResponse({"detail": detail, "reason": reason}, status, headers=headers or None)

    @app.exception_handler(sa.exc.TimeoutError)
    async def _pool_exhausted(_request: Request, _exc: sa.exc.TimeoutError) -> JSONResponse:
        # Load shedding keeps the API within its pool; this is the last line, never a 500.
        log.warning("no database connection free for an API request; answered 503")
        return JSONResponse(
            {"detail": "the gateway is busy; try again in 1 s", "reason": "overloaded"},
            status_code=503,
            headers={"Retry-After": "1"},
        )


def _methods_of(request: Request) -> list[str]:
    """The methods the OpenAPI document lists for this path (Starlette's 405 names only the
    first matching route's). As OpenAPI says, a path with fixed segments wins over a template
    that also matches (``/devices/claim`` over ``/devices/{device_id}``)."""
    path = request.url.path
    best: tuple[int, list[str]] | None = None
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path) is None:
            continue
        fixed = sum(1 for part in template.split("/") if part and not part.startswith("{"))
        methods = sorted(m.upper() for m in operations if m in _HTTP_METHODS)
        if best is None or fixed > best[0]:
            best = (fixed, methods)
    return best[1] if best else []


_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413 before anything reads them whole.

    Checks the declared Content-Length and also counts streamed chunks (a client may lie or use
    chunked encoding). `overrides` maps path prefixes to their own limits (bundle uploads).
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, overrides: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.overrides = overrides or {}

    def _limit(self, path: str) -> int:
        for prefix, limit in self.overrides.items():
            if path.startswith(prefix):
                return limit
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope["path"])
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await answer(send, 413, "too_large", _too_large(limit))
                return
        seen = 0
        early = EarlyAnswer(send)

        async def limited_receive() -> Message:
            nonlocal seen
            if early.answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # chunked, or a Content-Length that lied
                    return await early.answer(413, "too_large", _too_large(limit))
            return message

        await self.app(scope, limited_receive, early.send)


def _too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes"
