"""`edgefleet agent run`: stay connected, report status, run signed commands.

The MQTT session is persistent (clean_start=False, a long session expiry), so commands sent while
the machine was offline arrive when it is back. paho-mqtt reconnects with backoff through broker
restarts and network loss; the Last Will marks the machine offline when it vanishes.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent import __version__
from edge_agent.command_inbox import CommandInbox
from edge_agent.settings import AgentSettings
from edge_agent.state import AgentState, Identity
from provisioning.commands import CommandResult, PingResult
from provisioning.jwt_rules import Command, TokenRejected
from provisioning.mqtt import MqttEndpoint, make_client, start_client, stop_client
from provisioning.states import CommandKind, CommandState
from provisioning.wire import DeviceStatus, Reply, Topics

log = logging.getLogger(__name__)
SESSION_EXPIRY_SECONDS = 30 * 24 * 3600

Progress = Callable[[str, str | None], None]
Handler = Callable[[Command, Progress], CommandResult]
"""Runs one command kind: reports progress, returns the result (`provisioning.commands`)."""


class Component(Protocol):
    """A part of the agent that lives as long as it runs (telemetry, tunnels, ...).

    paho's callbacks are forwarded to every component from the network thread: they must return
    at once (hand work to a thread of their own). `status()` adds fields to the status message.
    """

    def start(self, agent: Agent) -> None: ...

    def stop(self) -> None: ...

    def on_connect(self) -> None: ...

    def on_disconnect(self) -> None: ...

    def on_publish(self, mid: int, reason_code: ReasonCode) -> None: ...

    def status(self) -> dict[str, Any]: ...


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        handlers: dict[str, Handler] | None = None,
        components: list[Component] | None = None,
    ) -> None:
        self.settings = settings
        self.identity: Identity = AgentState(settings.state_dir).load()
        self.topics = Topics(self.identity.enrollment.topic_prefix)
        self.inbox = CommandInbox(
            settings.state_dir / "commands.db",
            self.identity.gateway_public_key,
            self.identity.enrollment.gateway_id,
            self.identity.device_id,
        )
        self.handlers: dict[str, Handler] = {CommandKind.ping: _ping, **(handlers or {})}
        self.components: list[Component] = list(components or [])
        self._work: queue.Queue[Command | None] = queue.Queue()
        self._stopped = threading.Event()
        self.connected = threading.Event()
        self._node_red_version_seen: str | None = None
        self._node_red_probed = False
        broker = self.identity.enrollment.broker
        self.endpoint = MqttEndpoint(
            host=self.identity.broker_host,
            port=broker.port,
            tls=broker.tls,
            username=broker.username,
            password=broker.password,
            ca_file=self.identity.ca_path,
        )
        self.client = self._make_client()

    # ---- connection ---------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        ident = self.identity
        broker = ident.enrollment.broker
        client = make_client(
            self.endpoint,
            broker.client_id,
            name="agent",
            on_connected=self._on_connect,
            max_reconnect_delay=self.settings.max_reconnect_delay,
        )
        offline = DeviceStatus(state="offline", agent_version=__version__)
        client.will_set(
            self.topics.status(ident.device_id), offline.model_dump_json(), qos=1, retain=True
        )
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _on_connect(self, client: mqtt.Client, flags: mqtt.ConnectFlags) -> None:
        log.info("connected to the broker (session present: %s)", flags.session_present)
        client.subscribe(self.topics.cmd(self.identity.device_id), qos=1)
        self.publish_status()
        self.connected.set()
        for component in self.components:
            component.on_connect()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: Any, reason_code: ReasonCode, _p: Any
    ) -> None:
        self.connected.clear()
        for component in self.components:
            component.on_disconnect()
        if not self._stopped.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def _on_publish(
        self, _c: mqtt.Client, _u: Any, mid: int, reason_code: ReasonCode, _p: Any
    ) -> None:
        for component in self.components:
            component.on_publish(mid, reason_code)

    def publish_status(self, state: str = "online") -> mqtt.MQTTMessageInfo:
        extra: dict[str, Any] = {}
        for component in self.components:
            extra.update(component.status())
        status = DeviceStatus(
            state="online" if state == "online" else "offline",
            agent_version=__version__,
            node_red_version=self._node_red_version_seen,
            node_red_up=self._node_red_up(),
            ts=time.time(),
            **extra,
        )
        return self.client.publish(
            self.topics.status(self.identity.device_id),
            status.model_dump_json(exclude_none=True),
            qos=1,
            retain=True,
        )

    def _node_red_up(self) -> bool | None:
        """Whether Node-RED answered the last probe (None before the first)."""
        return self._node_red_version_seen is not None if self._node_red_probed else None

    def _watch_node_red(self) -> None:
        """Probe Node-RED's version off the network thread; republish the status on a change."""
        while not self._stopped.is_set():
            version = self._node_red_version()
            if version != self._node_red_version_seen or not self._node_red_probed:
                self._node_red_version_seen = version
                self._node_red_probed = True
                if self.connected.is_set():
                    self.publish_status()
            self._stopped.wait(30)

    def _node_red_version(self) -> str | None:
        try:
            response = httpx.get(self.settings.node_red.rstrip("/") + "/settings", timeout=2)
            version = response.json().get("version") if response.is_success else None
            return str(version) if version else None
        except (httpx.HTTPError, ValueError):
            return None

    # ---- commands -----------------------------------------------------------------------
    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            command = self.inbox.verify(bytes(msg.payload))
        except TokenRejected as exc:
            log.warning("refused a command on %s: %s (%s)", msg.topic, exc, exc.reason)
            refused = Reply(
                command_id="?", state=CommandState.refused, detail=f"{exc.reason}: {exc}"
            )
            self._reply(refused)
            return
        self._work.put(command)  # never block paho's network thread

    def _run_commands(self) -> None:
        while (command := self._work.get()) is not None:
            seen = self.inbox.admit(command)
            if seen is not None:
                log.info("command %s seen before; reporting its result again", command.id)
                self._report(command.id, seen.result or {"state": CommandState.running})
                continue
            result = self._execute(command).data()
            self.inbox.finish(command.id, result)
            self._report(command.id, result)

    def _report(self, command_id: str, result: dict[str, Any]) -> None:
        """A command's result as its reply: its state and detail, and all of it as the data."""
        detail = result.get("detail")
        self._reply(
            Reply(
                command_id=command_id,
                state=str(result.get("state")),
                detail=detail if isinstance(detail, str) else None,
                data=result,
            )
        )

    def _execute(self, command: Command) -> CommandResult:
        handler = self.handlers.get(command.kind)
        if handler is None:
            return CommandResult(
                state=CommandState.refused, detail=f"unknown command {command.kind!r}"
            )

        def progress(state: str, detail: str | None = None) -> None:
            self._reply(Reply(command_id=command.id, state=state, detail=detail))

        try:
            return handler(command, progress)
        except Exception as exc:
            log.exception("command %s (%s) failed", command.id, command.kind)
            return CommandResult(state=CommandState.failed, detail=str(exc))

    def _reply(self, reply: Reply) -> None:
        reply.ts = time.time()
        self.client.publish(
            self.topics.reply(self.identity.device_id), reply.model_dump_json(), qos=1
        )

    # ---- lifecycle ----------------------------------------------------------------------
    def run(self) -> None:
        """Run until stop() (from a signal handler or another thread)."""
        worker = threading.Thread(target=self._run_commands, name="commands", daemon=True)
        worker.start()
        for component in self.components:
            component.start(self)
        threading.Thread(target=self._watch_node_red, name="node-red-probe", daemon=True).start()
        start_client(
            self.client,
            self.endpoint,
            keepalive=self.settings.keepalive,
            clean_start=False,
            session_expiry=SESSION_EXPIRY_SECONDS,
        )
        log.info(
            "agent %s running; broker %s:%d",
            self.identity.device_id,
            self.identity.broker_host,
            self.identity.enrollment.broker.port,
        )
        self._stopped.wait()
        for component in reversed(self.components):
            component.stop()
        if self.connected.is_set():
            self.publish_status("offline").wait_for_publish(timeout=5)
        stop_client(self.client)
        self._work.put(None)
        worker.join(timeout=10)
        self.inbox.close()

    def stop(self) -> None:
        self._stopped.set()


def _ping(command: Command, _progress: Progress) -> PingResult:
    return PingResult(
        state=CommandState.succeeded, detail="pong", echo=json.loads(json.dumps(command.args))
    )
