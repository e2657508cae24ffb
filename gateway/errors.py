"""Errors the gateway's services raise; the HTTP layer turns them into `{detail, reason}` bodies."""

from __future__ import annotations


class GatewayError(Exception):
    status = 400

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class NotFound(GatewayError):
    status = 404


class Conflict(GatewayError):
    status = 409


class Unauthorized(GatewayError):
    status = 401


class Forbidden(GatewayError):
    status = 403


class Invalid(GatewayError):
    status = 422


class Unavailable(GatewayError):
    status = 503
