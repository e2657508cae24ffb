"""The tools that change WireGuard interfaces: `wg`, `ip` and `sysctl`, each a list-argument
subprocess (in a network namespace when asked). Secrets go to `wg` through stdin."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network

from provisioning.wireguard.config import DEFAULT_MTU, WgConfigError
from provisioning.wireguard.keys import normalize_key

_IFNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
_NETNS_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class WireGuardError(RuntimeError):
    """Something on the WireGuard side (a tool, wireguard-go, an interface) did not work."""


class WgCommandError(WireGuardError):
    """A `wg`, `ip`, `nft` or `sysctl` call failed; carries the command and its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(
            f"command {' '.join(self.argv)!r} failed with exit code {returncode}: "
            f"{self.stderr or '(no message)'}"
        )

    @property
    def tool_missing(self) -> bool:
        """The tool itself is not installed (directly, or under `ip netns exec`)."""
        return self.returncode == 127 or self.stderr.startswith("exec of ")


# ------------------------------------------------------------------------------ names, commands


def check_interface_name(name: str) -> str:
    """Return `name` if it is a usable interface name (1-15 chars, letters/digits/`_.-`)."""
    if not isinstance(name, str) or not _IFNAME_RE.match(name):
        raise ValueError(
            f"interface name {name!r} is not valid: use 1 to 15 letters, digits, '_', '.' or '-'"
        )
    return name


def check_netns(netns: str | None) -> str | None:
    if netns is not None and not _NETNS_RE.match(netns):
        raise ValueError(f"network namespace name {netns!r} is not valid")
    return netns


def netns_argv(argv: Sequence[str], netns: str | None) -> list[str]:
    """`argv` prefixed to run inside `netns` (unchanged when `netns` is None)."""
    if check_netns(netns) is None:
        return list(argv)
    return ["ip", "netns", "exec", str(netns), *argv]


def run_command(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    input_text: str | None = None,
    timeout: float = 15.0,
) -> str:
    """Run a tool (in `netns` if given) and return its stdout; raise WgCommandError on failure.

    `input_text` goes to stdin, which is how secrets reach `wg` (never through argv).
    """
    full = netns_argv(argv, netns)
    try:
        proc = subprocess.run(
            full,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise WgCommandError(full, 127, f"{full[0]} is not installed ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise WgCommandError(full, -1, f"timed out after {timeout:.0f}s") from exc
    if proc.returncode != 0:
        raise WgCommandError(full, proc.returncode, proc.stderr)
    return proc.stdout


# ------------------------------------------------------------------------------------------ wg


@dataclass(frozen=True)
class PeerUpdate:
    """One peer's wanted state for `wg set` (`remove=True` deletes the peer)."""

    public_key: str
    allowed_ips: tuple[IPv4Network, ...] = ()
    endpoint: str | None = None
    persistent_keepalive: int | None = None
    remove: bool = False


def wg_set_private_key(
    interface: str, private_key: str, *, listen_port: int | None = None, netns: str | None = None
) -> None:
    """Give `interface` its private key through stdin (and optionally its UDP listen port)."""
    normalize_key(private_key, "private key")
    argv = ["wg", "set", check_interface_name(interface)]
    if listen_port is not None:
        argv += ["listen-port", str(int(listen_port))]
    argv += ["private-key", "/dev/stdin"]
    run_command(argv, netns=netns, input_text=private_key.strip() + "\n")


def wg_set_peers(
    interface: str, updates: Iterable[PeerUpdate], *, netns: str | None = None
) -> None:
    """Apply several peer changes in one `wg set` call (one UAPI transaction)."""
    argv = ["wg", "set", check_interface_name(interface)]
    count = 0
    for update in updates:
        count += 1
        argv += ["peer", normalize_key(update.public_key)]
        if update.remove:
            argv.append("remove")
            continue
        argv += ["allowed-ips", ",".join(str(net) for net in update.allowed_ips)]
        if update.endpoint is not None:
            argv += ["endpoint", update.endpoint]
        if update.persistent_keepalive is not None:
            argv += ["persistent-keepalive", str(int(update.persistent_keepalive))]
    if count:
        run_command(argv, netns=netns)


@dataclass(frozen=True)
class PeerStats:
    """One peer as `wg show IFACE dump` reports it. `last_handshake` is a Unix time or None."""

    public_key: str
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int | None

    def handshake_age(self, now: float | None = None) -> float | None:
        """Seconds since the last handshake (None if there never was one): the liveness signal."""
        if self.last_handshake is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.last_handshake)


@dataclass(frozen=True)
class InterfaceState:
    """An interface's public side and its peers, from `wg show IFACE dump`."""

    public_key: str
    listen_port: int
    peers: Mapping[str, PeerStats]


def parse_wg_dump(text: str) -> InterfaceState:
    """Parse `wg show IFACE dump` (tab separated; the first line is the interface itself).

    The private key in the first line is dropped here and never kept.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise WgConfigError("`wg show dump` printed nothing; is the interface up?")
    head = lines[0].split("\t")
    if len(head) != 4:
        raise WgConfigError(f"unexpected interface line in `wg show dump` ({len(head)} fields)")
    peers: dict[str, PeerStats] = {}
    for line in lines[1:]:
        cols = line.split("\t")
        if len(cols) != 8:
            raise WgConfigError(f"unexpected peer line in `wg show dump` ({len(cols)} fields)")
        pub, _psk, endpoint, allowed, handshake, rx, tx, keepalive = cols
        peers[pub] = PeerStats(
            public_key=pub,
            endpoint=None if endpoint == "(none)" else endpoint,
            allowed_ips=tuple(a for a in allowed.split(",") if a and a != "(none)"),
            last_handshake=float(handshake) if handshake != "0" else None,
            rx_bytes=int(rx),
            tx_bytes=int(tx),
            persistent_keepalive=None if keepalive == "off" else int(keepalive),
        )
    return InterfaceState(public_key=head[1], listen_port=int(head[2]), peers=peers)


def wg_show_dump(interface: str, *, netns: str | None = None) -> InterfaceState:
    """The live state of `interface` (peers, handshakes, bytes)."""
    out = run_command(["wg", "show", check_interface_name(interface), "dump"], netns=netns)
    return parse_wg_dump(out)


# ------------------------------------------------------------------------------------ ip, sysctl


def link_exists(interface: str, *, netns: str | None = None) -> bool:
    """Whether a network interface of that name exists (in `netns`)."""
    try:
        run_command(["ip", "link", "show", "dev", check_interface_name(interface)], netns=netns)
    except WgCommandError:
        return False
    return True


def configure_link(
    interface: str,
    *,
    address: IPv4Interface,
    mtu: int,
    routes: Iterable[IPv4Network] = (),
    netns: str | None = None,
) -> None:
    """Address, MTU and up state of a tunnel interface, plus routes through it (idempotent)."""
    name = check_interface_name(interface)
    if not 576 <= mtu <= 65535:
        raise ValueError(f"MTU {mtu} is out of range: use 576..65535 (default {DEFAULT_MTU})")
    run_command(["ip", "address", "replace", str(address), "dev", name], netns=netns)
    run_command(["ip", "link", "set", "dev", name, "mtu", str(mtu), "up"], netns=netns)
    for route in routes:
        run_command(["ip", "route", "replace", str(route), "dev", name], netns=netns)


def set_sysctl(key: str, value: str, *, netns: str | None = None) -> None:
    """Set one sysctl (inside `netns` when given: network sysctls are per namespace)."""
    run_command(["sysctl", "-q", "-w", f"{key}={value}"], netns=netns)
