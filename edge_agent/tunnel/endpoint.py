"""The device's end of a support tunnel: fresh keys, outbound WireGuard, local filter, hard expiry.

One session at a time per interface. Bringing it up is split in two so the hub can add the
device's peer before the device dials (a handshake to a peer the hub does not know yet is retried
only after ~5 s):

1. `prepare(session)` checks the owner's policy, makes a key pair for this session only, installs
   the local nftables filter, starts wireguard-go, sets key, address, MTU and routes, arms the
   expiry timer, and returns the public key (the agent reports it to the gateway);
2. `connect()` adds the hub as the only peer (endpoint, AllowedIPs = engineer /32 + hub /32,
   PersistentKeepalive so the customer's NAT keeps the path open), which dials at once.

`open(session)` does both for callers that cannot split them.

The private key is handed to wireguard-go through `wg`'s stdin and is kept nowhere else: not on a
command line, not on disk. Expiry needs no gateway: a timer tears everything down at
`expires_at`, and wireguard-go runs under coreutils `timeout` as a second, process-level deadline
that holds even if the agent itself dies. A small state file (no secrets) lets a restarted agent
re-arm or clean up with `recover()`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, ip_address
from pathlib import Path
from typing import Any

from edge_agent.tunnel.firewall import AgentFirewall
from edge_agent.tunnel.policy import TunnelPolicy
from provisioning.wg import (
    DEFAULT_KEEPALIVE,
    DEFAULT_MTU,
    PeerStats,
    PeerUpdate,
    WgKeyError,
    WireGuardError,
    WireGuardGo,
    check_interface_name,
    configure_link,
    generate_keypair,
    host_network,
    link_exists,
    normalize_key,
    run_command,
    wg_set_peers,
    wg_set_private_key,
    wg_show_dump,
    write_secret_file,
)

logger = logging.getLogger(__name__)

DEFAULT_INTERFACE = "eftun0"
#: How long after `expires_at` the process-level deadline (`timeout`) kills wireguard-go if the
#: agent's own timer did not run (agent dead or hung).
HARD_STOP_GRACE = 5.0
_TUNNEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

CloseCallback = Callable[["TunnelSession", str], None]


class InvalidTunnelSession(ValueError):
    """A tunnel request is malformed (bad address, key, port, endpoint...)."""


class TunnelEndpointError(WireGuardError):
    """The endpoint cannot do what was asked in its current state."""


def _ipv4(value: Any, what: str) -> IPv4Address:
    try:
        addr = ip_address(value)
    except ValueError as exc:
        raise InvalidTunnelSession(f"{what} {value!r} is not an IP address") from exc
    if not isinstance(addr, IPv4Address):
        raise InvalidTunnelSession(f"{what} {value!r} must be IPv4")
    return addr


@dataclass(frozen=True)
class TunnelSession:
    """What a `tunnel.open` command asks this device to bring up."""

    tunnel_id: str
    device_ip: IPv4Address
    engineer_ip: IPv4Address
    hub_ip: IPv4Address
    hub_public_key: str
    hub_endpoint: str
    ports: frozenset[int] = field(default_factory=frozenset)
    expires_at: float = 0.0
    mtu: int = DEFAULT_MTU
    keepalive: int = DEFAULT_KEEPALIVE

    def __post_init__(self) -> None:
        if not isinstance(self.tunnel_id, str) or not _TUNNEL_ID_RE.match(self.tunnel_id):
            raise InvalidTunnelSession(
                f"tunnel id {self.tunnel_id!r} is not valid: 1-64 letters, digits, '_' or '-'"
            )
        setattr_ = object.__setattr__
        setattr_(self, "device_ip", _ipv4(self.device_ip, "device address"))
        setattr_(self, "engineer_ip", _ipv4(self.engineer_ip, "engineer address"))
        setattr_(self, "hub_ip", _ipv4(self.hub_ip, "hub address"))
        if len({self.device_ip, self.engineer_ip, self.hub_ip}) != 3:
            raise InvalidTunnelSession("device, engineer and hub addresses must all differ")
        try:
            setattr_(self, "hub_public_key", normalize_key(self.hub_public_key, "hub public key"))
        except WgKeyError as exc:
            raise InvalidTunnelSession(str(exc)) from exc
        host, sep, port = str(self.hub_endpoint).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidTunnelSession(
                f"hub endpoint {self.hub_endpoint!r} must be HOST:PORT with a port 1..65535"
            )
        ports = frozenset(self.ports)
        bad = [
            p for p in ports if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536
        ]
        if not ports or bad:
            raise InvalidTunnelSession(
                f"ports must be a non-empty list of 1..65535, got {bad or []}"
            )
        setattr_(self, "ports", ports)
        if isinstance(self.expires_at, bool) or not isinstance(self.expires_at, int | float):
            raise InvalidTunnelSession("expires_at must be a Unix time in seconds")
        setattr_(self, "expires_at", float(self.expires_at))
        if not 576 <= self.mtu <= 65535:
            raise InvalidTunnelSession(f"MTU {self.mtu} is out of range 576..65535")
        if not 0 < self.keepalive <= 65535:
            raise InvalidTunnelSession(f"keepalive {self.keepalive} must be 1..65535 seconds")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TunnelSession:
        """Build from a decoded command payload; missing or unknown keys raise clearly."""
        names = {
            "tunnel_id",
            "device_ip",
            "engineer_ip",
            "hub_ip",
            "hub_public_key",
            "hub_endpoint",
            "ports",
            "expires_at",
            "mtu",
            "keepalive",
        }
        unknown = set(data) - names
        if unknown:
            raise InvalidTunnelSession(f"unknown tunnel fields {sorted(unknown)}")
        missing = names - {"mtu", "keepalive"} - set(data)
        if missing:
            raise InvalidTunnelSession(f"tunnel request lacks {sorted(missing)}")
        ports = data["ports"]
        if isinstance(ports, str | bytes) or not isinstance(ports, Iterable):
            raise InvalidTunnelSession("ports must be a list of port numbers")
        return cls(**{**data, "ports": frozenset(ports)})

    def to_mapping(self) -> dict[str, Any]:
        """JSON-ready form (inverse of `from_mapping`)."""
        return {
            "tunnel_id": self.tunnel_id,
            "device_ip": str(self.device_ip),
            "engineer_ip": str(self.engineer_ip),
            "hub_ip": str(self.hub_ip),
            "hub_public_key": self.hub_public_key,
            "hub_endpoint": self.hub_endpoint,
            "ports": sorted(self.ports),
            "expires_at": self.expires_at,
            "mtu": self.mtu,
            "keepalive": self.keepalive,
        }


class TunnelEndpoint:
    """The device's tunnel interface: one session at a time, torn down at expiry by itself."""

    def __init__(
        self,
        state_dir: Path,
        policy: TunnelPolicy,
        *,
        interface: str = DEFAULT_INTERFACE,
        netns: str | None = None,
        on_close: CloseCallback | None = None,
        hard_stop_grace: float = HARD_STOP_GRACE,
    ) -> None:
        if hard_stop_grace <= 0:
            raise ValueError("hard_stop_grace must be positive seconds")
        self.hard_stop_grace = hard_stop_grace
        self.state_dir = Path(state_dir)
        self.policy = policy
        self.interface = check_interface_name(interface)
        self.netns = netns
        self.on_close = on_close
        self.firewall = AgentFirewall(self.interface, netns=netns)
        self._process = WireGuardGo(
            self.interface,
            netns=netns,
            pid_file=self.state_dir / f"{self.interface}.pid",
            log_file=self.state_dir / f"{self.interface}.log",
        )
        self._state_file = self.state_dir / f"tunnel-{self.interface}.json"
        self._lock = threading.RLock()
        self._session: TunnelSession | None = None
        self._public_key: str | None = None
        self._timer: threading.Timer | None = None

    @property
    def session(self) -> TunnelSession | None:
        """The open session, if any."""
        return self._session

    @property
    def public_key(self) -> str | None:
        """This session's public key (None when closed)."""
        return self._public_key

    @property
    def pid(self) -> int | None:
        """Process id of the supervised wireguard-go (its `timeout` wrapper)."""
        return self._process.pid

    # ------------------------------------------------------------------ open

    def prepare(self, session: TunnelSession) -> str:
        """Bring the interface up without dialing; return this session's public key.

        Raises TunnelRefused (from the owner's policy) before anything is touched, and
        TunnelEndpointError if a session is already open. On any failure half-way, everything
        made so far is removed again.
        """
        with self._lock:
            if self._session is not None:
                raise TunnelEndpointError(
                    f"tunnel {self._session.tunnel_id} is already open on {self.interface}; "
                    "close it first"
                )
            self.policy.check(session)
            remaining = session.expires_at - time.time()
            keys = generate_keypair()
            self._session = session
            self._public_key = keys.public_key
            try:
                self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._write_state(session, keys.public_key)
                self.firewall.apply(
                    engineer_ip=session.engineer_ip,
                    device_ip=session.device_ip,
                    ports=session.ports,
                )
                self._process.start(max_lifetime=remaining + self.hard_stop_grace)
                wg_set_private_key(self.interface, keys.private_key, netns=self.netns)
                configure_link(
                    self.interface,
                    address=IPv4Interface(f"{session.device_ip}/32"),
                    mtu=session.mtu,
                    routes=[host_network(session.engineer_ip), host_network(session.hub_ip)],
                    netns=self.netns,
                )
                self._arm_timer(session)
            except BaseException:
                logger.exception(
                    "tunnel %s: bringing up %s failed", session.tunnel_id, self.interface
                )
                with contextlib.suppress(TunnelEndpointError):
                    self._teardown()
                raise
            logger.info(
                "tunnel %s prepared on %s: %s, engineer %s, ports %s, expires in %.0fs",
                session.tunnel_id,
                self.interface,
                session.device_ip,
                session.engineer_ip,
                sorted(session.ports),
                remaining,
            )
            return keys.public_key

    def connect(self) -> None:
        """Add the hub as the only peer, which starts the handshake (outbound, keepalive)."""
        with self._lock:
            session = self._session
            if session is None:
                raise TunnelEndpointError(f"no tunnel is prepared on {self.interface}")
            wg_set_peers(
                self.interface,
                [
                    PeerUpdate(
                        session.hub_public_key,
                        (host_network(session.engineer_ip), host_network(session.hub_ip)),
                        endpoint=session.hub_endpoint,
                        persistent_keepalive=session.keepalive,
                    )
                ],
                netns=self.netns,
            )
            logger.info("tunnel %s dialing hub %s", session.tunnel_id, session.hub_endpoint)

    def open(self, session: TunnelSession) -> str:
        """`prepare` then `connect`; returns the public key."""
        public_key = self.prepare(session)
        try:
            self.connect()
        except BaseException:
            self.close("failed")
            raise
        return public_key

    # ------------------------------------------------------------------ close

    def close(self, reason: str = "closed") -> bool:
        """Remove interface, process, rules and state of the open session; False if none."""
        with self._lock:
            session = self._session
            if session is None:
                return False
            error: TunnelEndpointError | None = None
            try:
                self._teardown()
            except TunnelEndpointError as exc:
                error = exc
        logger.info("tunnel %s on %s ended: %s", session.tunnel_id, self.interface, reason)
        if self.on_close is not None:
            try:
                self.on_close(session, reason)
            except Exception:
                logger.exception("tunnel %s: on_close callback failed", session.tunnel_id)
        if error is not None:
            raise error
        return True

    def _expire(self) -> None:
        self.close("expired")

    def _arm_timer(self, session: TunnelSession) -> None:
        delay = max(0.0, session.expires_at - time.time())
        timer = threading.Timer(delay, self._expire)
        timer.name = f"tunnel-expiry-{self.interface}"
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _teardown(self) -> None:
        """Best effort on every step; failures are logged and reported after all were tried."""
        errors: list[str] = []
        timer, self._timer = self._timer, None
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
        try:
            if self._process.pid is None:
                self._process.adopt()
            self._process.stop()
        except OSError as exc:
            errors.append(f"stopping wireguard-go: {exc}")
        try:
            if link_exists(self.interface, netns=self.netns):
                run_command(["ip", "link", "delete", "dev", self.interface], netns=self.netns)
        except WireGuardError as exc:
            errors.append(f"deleting {self.interface}: {exc}")
        try:
            self.firewall.remove()
        except WireGuardError as exc:
            errors.append(f"removing firewall: {exc}")
        with contextlib.suppress(FileNotFoundError):
            self._state_file.unlink()
        self._session = None
        self._public_key = None
        if errors:
            logger.error("tunnel teardown on %s incomplete: %s", self.interface, "; ".join(errors))
            raise TunnelEndpointError(
                f"tunnel on {self.interface} was not fully removed: {'; '.join(errors)}"
            )

    # ------------------------------------------------------------------ restart, state

    def _write_state(self, session: TunnelSession, public_key: str) -> None:
        state = {"session": session.to_mapping(), "public_key": public_key}
        write_secret_file(self._state_file, json.dumps(state))

    def recover(self) -> TunnelSession | None:
        """After an agent restart: re-arm the timer of a live session, or clean up what is left.

        Returns the session that is still open, or None.
        """
        with self._lock:
            if self._session is not None:
                return self._session
            try:
                state = json.loads(self._state_file.read_text(encoding="utf-8"))
                session = TunnelSession.from_mapping(state["session"])
                public_key = str(state["public_key"])
            except FileNotFoundError:
                session = None
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning(
                    "tunnel state %s unreadable (%s); cleaning up", self._state_file, exc
                )
                session = None
            alive = self._process.adopt()
            if session is not None and alive and session.expires_at > time.time():
                self._session = session
                self._public_key = public_key
                self._arm_timer(session)
                logger.info("tunnel %s resumed on %s", session.tunnel_id, self.interface)
                return session
            leftovers = alive or self.firewall.installed() or self._state_file.exists()
            if leftovers:
                self._teardown()
                logger.info("removed a stale tunnel on %s", self.interface)
            return None

    def stats(self) -> PeerStats | None:
        """The hub peer's handshake time and byte counters (None when closed or not dialed)."""
        with self._lock:
            session = self._session
        if session is None:
            return None
        return wg_show_dump(self.interface, netns=self.netns).peers.get(session.hub_public_key)
