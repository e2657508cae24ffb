"""A busy or rude HTTP client cannot stall the gateway: a real `edgefleet gateway run` with small
limits (2 requests in flight, 2 waiting, short timeouts, 40 connections).

What holds it: `gateway/api/load_shedding.py` (in-flight bound, 503 with Retry-After, body
deadlines), `gateway/api/http_protocol.py` (request-head deadline, connection cap) and the body
size limit, which counts chunked bodies too.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing

import httpx
import pytest

from tests.support import local_http
from tests.support.gateway_process import GatewayProcess
from tests.support.waiting import wait_for

LIMITS = {
    "EDGEFLEET_HTTP_MAX_IN_FLIGHT": "2",
    "EDGEFLEET_HTTP_MAX_WAITING": "2",
    "EDGEFLEET_HTTP_QUEUE_TIMEOUT": "0.5",
    "EDGEFLEET_HTTP_HEADER_TIMEOUT": "1",
    "EDGEFLEET_HTTP_KEEP_ALIVE": "1",
    "EDGEFLEET_HTTP_BODY_TIMEOUT": "2",
    "EDGEFLEET_HTTP_READ_TIMEOUT": "2",
    "EDGEFLEET_HTTP_MAX_CONNECTIONS": "40",
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with GatewayProcess(tmp_path_factory.mktemp("overload") / "data", env=LIMITS) as gateway:
        yield gateway


def _open(gw: GatewayProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.http_port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _slow_body(gw: GatewayProcess) -> socket.socket:
    """A request that is admitted and then sends its body too slowly: it holds a place."""
    sock = _open(gw)
    sock.sendall(
        b"POST /api/v1/enroll HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    return sock


def _response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def _overloaded_count(gw: GatewayProcess) -> float:
    text = local_http.get(gw.url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith('edgefleet_http_refused_total{reason="overloaded"}'):
            return float(line.split()[-1])
    raise AssertionError("no edgefleet_http_refused_total in /metrics")


def test_beyond_the_places_and_the_queue_requests_get_503_with_retry_after(
    gw: GatewayProcess,
) -> None:
    headers = {"Authorization": f"Bearer {gw.admin_token}"}
    refused_before = _overloaded_count(gw)
    with ExitStack() as stack:
        holders = [stack.enter_context(closing(_slow_body(gw))) for _ in range(2)]
        # Both places are taken once the gateway is reading their bodies; wait until a request
        # has to queue (it is refused after the queue timeout), so the holders are surely in.
        wait_for(
            lambda: (
                local_http.get(gw.url + "/api/v1/devices", headers=headers, timeout=5).status_code
                == 503
            ),
            timeout=10,
            what="the two places taken",
        )
        results: list[httpx.Response] = []

        def ask() -> None:
            results.append(local_http.get(gw.url + "/api/v1/devices", headers=headers, timeout=10))

        askers = [threading.Thread(target=ask) for _ in range(6)]
        for asker in askers:
            asker.start()
        # While the API is saturated the health check answers at once: it takes no place.
        started = time.monotonic()
        health = local_http.get(gw.url + "/healthz", timeout=5)
        health_seconds = time.monotonic() - started
        for asker in askers:
            asker.join(15)
        assert health.status_code == 200 and health_seconds < 1.0
        assert [r.status_code for r in results] == [503] * 6
        for response in results:
            assert response.headers["Retry-After"] == "1"
            assert response.json()["reason"] == "overloaded"
        # The holders are cut off when their body deadline passes: 408, and the places free.
        for holder in holders:
            answer = _response(holder)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b'"reason":"body_timeout"' in answer
    assert local_http.get(gw.url + "/api/v1/devices", headers=headers).status_code == 200
    assert _overloaded_count(gw) >= refused_before + 7


def test_a_request_head_that_trickles_in_gets_408_and_the_connection_closes(
    gw: GatewayProcess,
) -> None:
    with closing(_open(gw)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n")  # and never the blank line
        answer = _response(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert sock.recv(100) == b""  # closed
    # A kept-alive connection that goes quiet after a response is closed too.
    with closing(_open(gw)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert _response(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /heal")
        tail = _response(sock)
        assert tail == b"" or tail.startswith(b"HTTP/1.1 408"), tail[:200]


def test_connections_beyond_the_cap_are_closed_at_once(gw: GatewayProcess) -> None:
    with ExitStack() as stack:
        held = [stack.enter_context(closing(_open(gw))) for _ in range(40)]
        extra = stack.enter_context(closing(_open(gw)))
        extra.settimeout(5)
        assert extra.recv(100) == b"", "a connection over the cap was kept open"
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert _response(held[0]).startswith(b"HTTP/1.1 200")  # those within are served


def test_a_chunked_body_over_the_limit_gets_413(gw: GatewayProcess) -> None:
    headers = {"Authorization": f"Bearer {gw.admin_token}", "Content-Type": "application/json"}

    def ten_megabytes() -> Iterator[bytes]:
        yield b'{"note": "'
        for _ in range(10 * 1024):
            yield b"x" * 1024
        yield b'"}'

    response = local_http.post(
        gw.url + "/api/v1/provisioning-tokens", content=ten_megabytes(), headers=headers
    )
    assert response.status_code == 413, response.text
    assert response.json()["reason"] == "too_large"
    assert local_http.get(gw.url + "/healthz").status_code == 200


def test_while_the_devices_come_first_new_requests_wait_then_go_or_get_503() -> None:
    """The gate itself (the gateway opens and closes it from the ingest's lag)."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from gateway.api.load_shedding import LoadShedding

    behind = {"now": True}

    async def ok(_request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = LoadShedding(
        Starlette(routes=[Route("/x", ok), Route("/healthz", ok)]),
        max_in_flight=4,
        max_waiting=10,
        queue_timeout=0.5,
        yield_to=lambda: behind["now"],
    )

    async def scenario() -> tuple[list[int], int, int, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            refused = (await client.get("/x")).status_code  # the gate stays closed: 503
            health = (await client.get("/healthz")).status_code  # never waits
            waiting = [asyncio.create_task(client.get("/x")) for _ in range(3)]
            await asyncio.sleep(0.1)
            assert not any(task.done() for task in waiting)
            behind["now"] = False
            codes = [(await task).status_code for task in waiting]
            behind["now"] = True  # closed again: a new request waits once more
            again = asyncio.create_task(client.get("/x"))
            await asyncio.sleep(0.1)
            still_waiting = not again.done()
            behind["now"] = False
            return codes, refused, health, (await again).status_code if still_waiting else -1

    codes, refused, health, again = asyncio.run(scenario())
    assert refused == 503 and health == 200
    assert codes == [200, 200, 200] and again == 200
