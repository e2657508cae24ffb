"""TCP plumbing for tests: byte pumps, and a relay that balances over targets across network
namespaces (the load balancer in front of several gateway replicas)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Sequence

from tests.support.netns import ns_socket

Where = tuple[str | None, str, int]  # (network namespace, None: this process's; host; port)


def _socket_in(netns: str | None) -> socket.socket:
    if netns is None:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    return ns_socket(netns)


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy `src` to `dst` until either end closes, then shut both down (a thread's work)."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Relay:
    """A TCP relay run by threads of this process: listens at `listen` and joins each client to
    the first of `targets` that accepts, starting one further along each time (with several
    targets, a round-robin load balancer that skips a dead one). A socket stays in the network
    namespace it was made in, so a relay can reach across namespaces."""

    def __init__(self, listen: Where, targets: Sequence[Where]) -> None:
        netns, host, port = listen
        self.targets = list(targets)
        self._lock = threading.Lock()
        self._turn = 0
        self._conns: list[socket.socket] = []
        self._listener = _socket_in(netns)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, name=f"relay-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._join, args=(client,), daemon=True).start()

    def _join(self, client: socket.socket) -> None:
        with self._lock:
            first, self._turn = self._turn, self._turn + 1
            self._conns.append(client)
        for index in range(len(self.targets)):
            netns, host, port = self.targets[(first + index) % len(self.targets)]
            upstream = _socket_in(netns)
            with self._lock:
                self._conns.append(upstream)
            upstream.settimeout(2)
            try:
                upstream.connect((host, port))
            except OSError:
                upstream.close()
                continue
            upstream.settimeout(None)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(src, dst), daemon=True).start()
            return
        client.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
