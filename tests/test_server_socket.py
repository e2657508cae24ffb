"""The gateway binds its HTTP socket itself (so the port is held from the first moment)."""

from __future__ import annotations

import socket

import pytest

from gateway.errors import StartupError
from gateway.server import listen_socket
from tests.support.waiting import free_port


def test_listener_is_listening_and_sends_without_delay() -> None:
    port = free_port()
    sock = listen_socket("127.0.0.1", port, "--http")
    try:
        # Without TCP_NODELAY each response waited out the client's delayed ACK (~45 ms).
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        with pytest.raises(StartupError, match="--http"):
            listen_socket("127.0.0.1", port, "--http")
    finally:
        sock.close()
