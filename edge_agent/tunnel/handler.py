"""Support tunnels on the machine: the `tunnel.open`, `tunnel.connect` and `tunnel.close` commands.

The commands and their two-step open are described in `provisioning.tunnel_command`; the device's
side of a session is `edge_agent.tunnel.endpoint`. A request the owner's policy does not allow is
answered `refused` with the reason, and nothing is brought up. A session that is prepared but
never told to dial is removed after `connect_timeout`; an open one ends at its expiry on the
device's own timer, with or without the gateway.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.runner import Agent, Handler, Progress
from edge_agent.settings import AgentSettings
from edge_agent.tunnel.endpoint import TunnelEndpoint, TunnelEndpointError
from edge_agent.tunnel.policy import TunnelPolicy, TunnelRefused
from provisioning.commands import CommandResult, InvalidArgs
from provisioning.jwt_rules import Command
from provisioning.states import CommandKind, CommandState
from provisioning.tunnel_command import (
    TunnelCloseArgs,
    TunnelCloseResult,
    TunnelOpenArgs,
    TunnelOpenResult,
    TunnelRef,
)
from provisioning.wireguard.tools import WireGuardError

log = logging.getLogger(__name__)

#: A prepared session the gateway never tells to dial is removed after this many seconds.
CONNECT_TIMEOUT = 120.0


def _tunnel_id(command: Command) -> str | None:
    try:
        return TunnelRef.parse(command.args).tunnel_id
    except InvalidArgs:
        return None


class TunnelCommands:
    """The tunnel command handlers, and the agent component that resumes a session at start."""

    def __init__(self, endpoint: TunnelEndpoint, *, connect_timeout: float = CONNECT_TIMEOUT):
        self.endpoint = endpoint
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._connect_timer: threading.Timer | None = None

    @classmethod
    def from_settings(cls, settings: AgentSettings) -> TunnelCommands:
        policy = TunnelPolicy(
            allowed=settings.tunnel_allowed,
            allowed_ports=frozenset(settings.tunnel_allowed_ports),
            max_ttl=settings.tunnel_max_ttl,
        )
        endpoint = TunnelEndpoint(
            settings.state_dir / "tunnel", policy, interface=settings.tunnel_interface
        )
        return cls(endpoint)

    def handlers(self) -> dict[str, Handler]:
        return {
            CommandKind.tunnel_open: self.open,
            CommandKind.tunnel_connect: self.connect,
            CommandKind.tunnel_close: self.close,
        }

    # ---- commands -------------------------------------------------------------------------
    def open(self, command: Command, _progress: Progress) -> TunnelOpenResult:
        refused = CommandState.refused
        try:
            session = TunnelOpenArgs.parse(command.args)
        except InvalidArgs as exc:
            return TunnelOpenResult(state=refused, detail=f"invalid tunnel request: {exc}")
        try:
            public_key = self.endpoint.prepare(session)
        except TunnelRefused as exc:
            log.warning("tunnel %s refused by the owner's policy: %s", session.tunnel_id, exc)
            return TunnelOpenResult(state=refused, detail=exc.reason, tunnel_id=session.tunnel_id)
        except TunnelEndpointError as exc:
            return TunnelOpenResult(state=refused, detail=str(exc), tunnel_id=session.tunnel_id)
        self._arm_connect_timer(session.tunnel_id)
        return TunnelOpenResult(
            state=CommandState.succeeded,
            detail=f"prepared on {self.endpoint.interface}; dialing on tunnel.connect",
            tunnel_id=session.tunnel_id,
            public_key=public_key,
        )

    def connect(self, command: Command, _progress: Progress) -> CommandResult:
        tunnel_id = _tunnel_id(command)
        session = self.endpoint.session
        if session is None or session.tunnel_id != tunnel_id:
            return CommandResult(
                state=CommandState.failed,
                detail=f"tunnel {tunnel_id} is not prepared here (expired or closed)",
            )
        self._cancel_connect_timer()
        self.endpoint.connect()
        return CommandResult(state=CommandState.succeeded, detail=f"dialing {session.hub_endpoint}")

    def close(self, command: Command, _progress: Progress) -> TunnelCloseResult:
        try:
            args: TunnelCloseArgs | None = TunnelCloseArgs.parse(command.args)
        except InvalidArgs:
            args = None
        tunnel_id = args.tunnel_id if args else None
        session = self.endpoint.session
        if session is None or session.tunnel_id != tunnel_id:
            return TunnelCloseResult(
                state=CommandState.succeeded, detail=f"tunnel {tunnel_id} is not open here"
            )
        self._cancel_connect_timer()
        reason = args.reason if args else None
        self.endpoint.close(reason or "closed by the gateway")
        return TunnelCloseResult(
            state=CommandState.succeeded, detail=f"tunnel {tunnel_id} closed", closed=True
        )

    # ---- the prepared-but-never-dialed guard ----------------------------------------------
    def _arm_connect_timer(self, tunnel_id: str) -> None:
        timer = threading.Timer(self.connect_timeout, self._never_connected, args=(tunnel_id,))
        timer.name = "tunnel-connect-timeout"
        timer.daemon = True
        with self._lock:
            old, self._connect_timer = self._connect_timer, timer
        if old is not None:
            old.cancel()
        timer.start()

    def _cancel_connect_timer(self) -> None:
        with self._lock:
            timer, self._connect_timer = self._connect_timer, None
        if timer is not None:
            timer.cancel()

    def _never_connected(self, tunnel_id: str) -> None:
        session = self.endpoint.session
        if session is not None and session.tunnel_id == tunnel_id:
            log.warning("tunnel %s was never told to dial; removing it", tunnel_id)
            self.endpoint.close("not connected in time")

    # ---- Component ------------------------------------------------------------------------
    def start(self, agent: Agent) -> None:
        """Resume a session left by the previous agent process, or remove what is left of it.

        A machine that never had a tunnel is not touched (it may have no nftables at all); one
        whose owner has since turned tunnels off gets its session closed.
        """
        if not self.endpoint.state_dir.exists():
            return
        try:
            session = self.endpoint.recover()
            if session is not None and not self.endpoint.policy.allowed:
                self.endpoint.close("support tunnels were turned off by the machine's owner")
        except (WireGuardError, OSError) as exc:
            log.error("support tunnel left from before could not be checked: %s", exc)

    def stop(self) -> None:
        # The session stays up across an agent restart (recover() resumes it); its expiry holds
        # without us: wireguard-go runs under `timeout`.
        self._cancel_connect_timer()

    def on_connect(self) -> None:
        pass

    def on_disconnect(self) -> None:
        pass

    def on_publish(self, mid: int, reason_code: ReasonCode) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {}
