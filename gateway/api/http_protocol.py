"""uvicorn's h11 protocol with a deadline for request heads and a cap on connections.

uvicorn closes a kept-alive connection that stays idle (``timeout_keep_alive``) but has no
deadline for the request line and headers: a client that sends one header byte every few seconds
holds its connection, and a few thousand of them hold every file descriptor. Here each request
head must be complete within ``header_timeout`` seconds of the connection opening (or of the
previous response), else the client gets ``408`` and the connection closes. Beyond
``max_connections`` open connections a new one is closed at once, before anything is read.

`guarded_protocol` makes the class `uvicorn.Config(http=...)` takes (uvicorn builds one protocol
object per connection and passes it only its own config).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_TIMEOUT_BODY = b'{"detail":"the request head arrived too slowly","reason":"header_timeout"}'


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0
    max_connections: int = 1000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.transport.close()
            return
        self._arm(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a request head arrived: the application has it now

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            # The next head may wait out the keep-alive period, then has the usual deadline.
            self._arm(self.timeout_keep_alive + self.header_timeout)

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(delay, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is running
        if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_TIMEOUT_BODY)).encode()),
                (b"connection", b"close"),
            ]
            with contextlib.suppress(h11.LocalProtocolError):
                self.transport.write(
                    (self.conn.send(h11.Response(status_code=408, headers=headers)) or b"")
                    + (self.conn.send(h11.Data(data=_TIMEOUT_BODY)) or b"")
                    + (self.conn.send(h11.EndOfMessage()) or b"")
                )
        self.transport.close()


def guarded_protocol(header_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A `GuardedH11Protocol` subclass with these limits."""
    return type(
        "GatewayH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )
