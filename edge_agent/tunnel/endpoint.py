"""The device's end of a support tunnel: fresh keys, outbound WireGuard, local filter, hard expiry.

One session (a `tunnel.open`'s `TunnelOpenArgs`) at a time per interface. Bringing it up is split
in two so the hub can add the device's peer before the device dials (a handshake to a peer the
hub does not know yet is retried only after ~5 s):

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
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Interface
from pathlib import Path

from edge_agent.tunnel.firewall import AgentFirewall
from edge_agent.tunnel.policy import TunnelPolicy
from provisioning.files import write_private
from provisioning.tunnel_command import TunnelOpenArgs
from provisioning.wireguard.config import host_network
from provisioning.wireguard.keys import generate_keypair
from provisioning.wireguard.tools import (
    PeerStats,
    PeerUpdate,
    WireGuardError,
    check_interface_name,
    configure_link,
    link_exists,
    run_command,
    wg_set_peers,
    wg_set_private_key,
    wg_show_dump,
)
from provisioning.wireguard.wireguard_go import WireGuardGo

logger = logging.getLogger(__name__)

DEFAULT_INTERFACE = "eftun0"
#: How long after `expires_at` the process-level deadline (`timeout`) kills wireguard-go if the
#: agent's own timer did not run (agent dead or hung).
HARD_STOP_GRACE = 5.0
CloseCallback = Callable[[TunnelOpenArgs, str], None]


class TunnelEndpointError(WireGuardError):
    """The endpoint cannot do what was asked in its current state."""


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
        self._session: TunnelOpenArgs | None = None
        self._public_key: str | None = None
        self._timer: threading.Timer | None = None

    @property
    def session(self) -> TunnelOpenArgs | None:
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

    def prepare(self, session: TunnelOpenArgs) -> str:
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

    def open(self, session: TunnelOpenArgs) -> str:
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

    def _arm_timer(self, session: TunnelOpenArgs) -> None:
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

    def _write_state(self, session: TunnelOpenArgs, public_key: str) -> None:
        state = {"session": session.model_dump(mode="json"), "public_key": public_key}
        write_private(self._state_file, json.dumps(state))

    def recover(self) -> TunnelOpenArgs | None:
        """After an agent restart: re-arm the timer of a live session, or clean up what is left.

        Returns the session that is still open, or None.
        """
        with self._lock:
            if self._session is not None:
                return self._session
            try:
                state = json.loads(self._state_file.read_text(encoding="utf-8"))
                session = TunnelOpenArgs.parse(state["session"])
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
