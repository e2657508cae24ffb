"""Network namespaces for tunnel tests: a small lab of hub, devices and engineers on one host.

`NetLab` makes namespaces with a unique prefix (`ef-<random>-<role>`), joins them with veth pairs
on private /30s created directly inside the namespaces (nothing appears in the host's own
namespace), and gives each WireGuard interface a host-unique name (wireguard-go's UAPI sockets in
/var/run/wireguard are shared by all namespaces). `close()` removes everything it made, also after a
failed test: the wireguard-go processes it started, any process left in its namespaces (only ours
can be there), stale UAPI sockets of its interface names, and the namespaces themselves, which takes
their veths, routes and nftables tables with them.

Sockets are opened inside a namespace from a short-lived thread that joins it with setns(2), so
tests talk through the tunnel without a subprocess per probe.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeVar

from provisioning.process import pid_alive
from provisioning.wireguard.tools import configure_link, run_command
from provisioning.wireguard.wireguard_go import UAPI_DIR, WireGuardGo
from tests.support.waiting import wait_for
from tests.support.wireguard import (
    parse_wg_quick,
    strip_wg_quick,
    wg_quick_addresses,
    wg_quick_allowed_ips,
)

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000
#: Links are numbered into this range, one /30 each (198.18.0.0/15 is for benchmarks/tests).
_LINK_BASE = IPv4Network("198.18.0.0/16")

ProbeResult = Literal["open", "refused", "timeout", "unreachable"]


def missing_requirements() -> str | None:
    """Why netns tests cannot run here (None if they can)."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "nft", "wg", "wireguard-go", "timeout", "sysctl"):
        if shutil.which(tool) is None:
            return f"needs {tool} on PATH"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun for wireguard-go"
    return None


def in_netns(netns: str, func: Callable[[], T]) -> T:
    """Run `func` in a thread that joined `netns`; sockets it makes stay in that namespace."""
    box: dict[str, T] = {}
    failure: list[BaseException] = []

    def target() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({netns}): {os.strerror(err)}")
        finally:
            os.close(fd)
        try:
            box["value"] = func()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    if "value" not in box:
        raise RuntimeError(f"could not enter network namespace {netns}")
    return box["value"]


def ns_socket(netns: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """An IPv4 socket that lives in `netns`."""
    return in_netns(netns, lambda: socket.socket(socket.AF_INET, kind))


def tcp_probe(netns: str, host: IPv4Address | str, port: int, timeout: float = 1.0) -> ProbeResult:
    """Try a TCP connection from `netns`: open, refused (RST), timeout (dropped) or unreachable."""
    sock = ns_socket(netns)
    sock.settimeout(timeout)
    try:
        sock.connect((str(host), port))
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM):
            return "unreachable"
        raise
    finally:
        sock.close()
    return "open"


def http_get(
    netns: str, host: IPv4Address | str, port: int, timeout: float = 2.0, path: str = "/"
) -> str:
    """GET `path` from inside `netns`; returns the body of a 200 answer, raises otherwise."""
    sock = ns_socket(netns)
    sock.settimeout(timeout)
    with sock:
        sock.connect((str(host), port))
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not (head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))):
        raise ConnectionError(f"unexpected answer from {host}:{port}: {head[:80]!r}")
    return body.decode()


class TinyServer:
    """A TCP server in a namespace, served by a thread of this process.

    mode "http": answers any request with 200 and `body`; "echo": echoes each line (a long-lived
    connection); "sink": reads everything and answers with the byte count (bulk transfer).
    """

    def __init__(
        self,
        netns: str,
        port: int,
        *,
        mode: Literal["http", "echo", "sink"] = "http",
        body: str = "hello",
        host: str = "0.0.0.0",
    ) -> None:
        self.netns, self.port, self.mode, self.body = netns, port, mode, body
        self._sock = ns_socket(netns)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, name=f"tiny-{netns}-{port}", daemon=True
        )
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn, contextlib.suppress(OSError):
            if self.mode == "http":
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(4096)):
                    data += chunk
                payload = self.body.encode()
                conn.sendall(
                    b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
                )
            elif self.mode == "echo":
                while chunk := conn.recv(4096):
                    conn.sendall(chunk)
            else:
                total = 0
                while chunk := conn.recv(1 << 20):
                    total += len(chunk)
                conn.sendall(str(total).encode())

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=2)


@dataclass(frozen=True)
class Link:
    """A veth pair between two namespaces: `a_ip` lives in `a`, `b_ip` in `b`."""

    a: str
    b: str
    a_ip: IPv4Address
    b_ip: IPv4Address


class NetLab:
    """Namespaces, links and WireGuard interfaces for one test module or bench run."""

    def __init__(self, tag: str | None = None) -> None:
        self.tag = tag or secrets.token_hex(3)
        self.prefix = f"ef-{self.tag}-"
        self.namespaces: list[str] = []
        self.links: list[Link] = []
        self.wg_names: set[str] = set()
        self._processes: list[WireGuardGo] = []
        self._servers: list[TinyServer] = []
        self._counter = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def ns(self, role: str) -> str:
        return self.prefix + role

    def add_namespace(self, role: str) -> str:
        """Create a namespace with loopback up."""
        name = self.ns(role)
        run_command(["ip", "netns", "add", name])
        self.namespaces.append(name)
        run_command(["ip", "link", "set", "lo", "up"], netns=name)
        return name

    def connect(self, a_role: str, b_role: str) -> Link:
        """A veth pair between two namespaces on the next private /30 (a gets .1, b gets .2)."""
        a, b = self.ns(a_role), self.ns(b_role)
        index = len(self.links)
        subnet = list(_LINK_BASE.subnets(new_prefix=30))[index]
        a_ip, b_ip = subnet.network_address + 1, subnet.network_address + 2
        a_dev, b_dev = f"v{index}-{b_role}"[:15], f"v{index}-{a_role}"[:15]
        run_command(
            ["ip", "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", b], netns=a
        )
        for ns_name, dev, ip in ((a, a_dev, a_ip), (b, b_dev, b_ip)):
            run_command(["ip", "address", "add", f"{ip}/30", "dev", dev], netns=ns_name)
            run_command(["ip", "link", "set", dev, "up"], netns=ns_name)
        link = Link(a, b, a_ip, b_ip)
        self.links.append(link)
        return link

    def ifname(self, role: str) -> str:
        """A WireGuard interface name unique on this host (<= 15 chars)."""
        self._counter += 1
        name = f"ef{self.tag}{role[:3]}{self._counter}"[:15]
        self.wg_names.add(name)
        return name

    def serve(
        self,
        role: str,
        port: int,
        *,
        mode: Literal["http", "echo", "sink"] = "http",
        body: str = "hello",
    ) -> TinyServer:
        """A TinyServer in the role's namespace, closed with the lab."""
        server = TinyServer(self.ns(role), port, mode=mode, body=body)
        self._servers.append(server)
        return server

    def wg_client(
        self,
        role: str,
        config_text: str,
        *,
        extra_allowed: Sequence[IPv4Network] = (),
    ) -> tuple[str, WireGuardGo]:
        """Bring up a wg-quick style client (the engineer's laptop) from its config text.

        `extra_allowed` widens the peer's AllowedIPs and routes: an engineer trying to reach more
        than the hub grants.
        """
        netns = self.ns(role)
        iface = self.ifname("cl")
        config = parse_wg_quick(config_text)
        for peer in config.peers.values():
            peer.allowed_ips = [*peer.allowed_ips, *(IPv4Interface(str(n)) for n in extra_allowed)]
        process = WireGuardGo(iface, netns=netns)
        process.start()
        self._processes.append(process)
        run_command(
            ["wg", "setconf", iface, "/dev/stdin"], netns=netns, input_text=strip_wg_quick(config)
        )
        addresses = wg_quick_addresses(config)
        configure_link(
            iface,
            address=addresses[0],
            mtu=config.mtu or 1280,
            routes=wg_quick_allowed_ips(config),
            netns=netns,
        )
        return iface, process

    def pids(self, role_or_ns: str) -> list[int]:
        """Processes running in a namespace of this lab."""
        name = role_or_ns if role_or_ns.startswith(self.prefix) else self.ns(role_or_ns)
        out = run_command(["ip", "netns", "pids", name])
        return [int(p) for p in out.split()]

    def close(self) -> None:
        """Remove everything this lab made (idempotent, tolerant of half-built labs)."""
        for server in self._servers:
            with contextlib.suppress(Exception):
                server.close()
        self._servers.clear()
        for process in self._processes:
            with contextlib.suppress(Exception):
                process.stop()
        self._processes.clear()
        for name in list(self.namespaces):
            with contextlib.suppress(Exception):
                self._kill_all(name)
        for iface in self.wg_names:
            with contextlib.suppress(FileNotFoundError):
                (UAPI_DIR / f"{iface}.sock").unlink()
        for name in reversed(self.namespaces):
            with contextlib.suppress(Exception):
                run_command(["ip", "netns", "delete", name])
        self.namespaces.clear()

    def _kill_all(self, netns: str) -> None:
        pids = self.pids(netns)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=3, what="processes end")
        except TimeoutError:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def leftover_namespaces(prefix: str) -> list[str]:
    """Namespaces with this prefix that still exist (for asserting cleanup)."""
    out = run_command(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def interfaces(netns: str) -> list[str]:
    """Interface names in a namespace."""
    out = run_command(["ip", "-o", "link", "show"], netns=netns)
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def nft_tables(netns: str) -> list[str]:
    """'family name' of every nftables table in a namespace."""
    out = run_command(["nft", "list", "tables"], netns=netns)
    return [line.removeprefix("table ").strip() for line in out.splitlines() if line.strip()]
