"""Answering a request from a middleware while the application is still reading its body.

An exception raised from ``receive`` does not reach the middleware that raised it: FastAPI turns
anything that goes wrong while it reads a body into ``400 There was an error parsing the body``.
So a middleware that must refuse a body half way (too large, too slow) sends its own answer at
once through `EarlyAnswer.answer`, hands the application a disconnect, and drops whatever the
application tries to send afterwards.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import Message, Send

from provisioning.wire import ErrorBody


class EarlyAnswer:
    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False  # the application began its response: too late to answer
        self.answered = False

    async def send(self, message: Message) -> None:
        if self.answered:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def answer(
        self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None
    ) -> Message:
        """Send `status` with an `ErrorBody` (unless a response already began); returns the
        disconnect message to give the application instead of its next body chunk."""
        if not self.started and not self.answered:
            await answer(self._send, status, reason, detail, headers)
        self.answered = True
        return {"type": "http.disconnect"}


async def answer(
    send: Send, status: int, reason: str, detail: str, headers: dict[str, str] | None = None
) -> None:
    """Send a whole `ErrorBody` response through `send`."""
    body = ErrorBody(detail=detail, reason=reason).model_dump(exclude_none=True)
    response = JSONResponse(body, status_code=status, headers=headers)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
