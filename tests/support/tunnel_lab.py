"""A whole support-tunnel setup in network namespaces: real gateway, real agents, engineers' CLI.

    hub ns:       `edgefleet gateway run --tunnel-hub` (its Mosquitto, SQLite, the WireGuard hub)
    devN ns:      `edgefleet agent run --allow-tunnels ...` (and what the engineer wants to reach)
    engN ns:      the engineer's `edgefleet tunnel ...` commands and their wireguard-go

The hub's public address (`PUBLIC_IP`, on the hub's loopback) is reached from every other
namespace over its own veth, the way machines and laptops reach a gateway across the internet;
the broker certificate names it. Everything runs from `NetLab`, so `close()` removes every
process, interface, rule and namespace, also after a failed test. Used by tests/test_tunnels_e2e.py
and bench/tunnel_bench.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from gateway.broker.dynsec import GATEWAY_USERNAME
from gateway.broker.mosquitto import gateway_password_path, pki_directory
from gateway.broker.pki import CA_CERT_NAME
from provisioning.mqtt import MqttEndpoint
from provisioning.wireguard.tools import link_exists, run_command
from tests.support import local_http
from tests.support.accounts import person_token
from tests.support.netns import NetLab, in_netns
from tests.support.waiting import wait_for

PUBLIC_IP = "203.0.113.1"
HTTP_PORT = 8080
MQTT_PORT = 8883
HUB_PORT = 51820
GATEWAY_URL = f"http://{PUBLIC_IP}:{HTTP_PORT}"


def edgefleet_argv() -> list[str]:
    script = Path(sys.executable).parent / "edgefleet"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edgefleet.cli"]


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


@dataclass
class Process:
    """A long-running `edgefleet` (or other) process inside a namespace, logging to a file."""

    netns: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> Process:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *self.argv],
            env=_env(self.env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(
                f"{self.argv[:3]} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, SIGKILL the group if it lingers; the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode if self.proc is not None else None


def ns_http(netns: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """An HTTP request made from inside `netns`."""
    return in_netns(netns, lambda: local_http.request(method, url, timeout=10.0, **kwargs))


@dataclass
class Cli:
    """`edgefleet` commands run by a person in one namespace, against the gateway."""

    netns: str
    token: str
    cwd: Path

    def run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["ip", "netns", "exec", self.netns, *edgefleet_argv(), *map(str, args)],
            env=_env({"EDGEFLEET_GATEWAY": GATEWAY_URL, "EDGEFLEET_TOKEN": self.token}),
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            cwd=self.cwd,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"`edgefleet {' '.join(map(str, args))}` in {self.netns} exited with "
                f"{done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
            )
        return done

    def json(self, *args: str | Path) -> Any:
        return json.loads(self.run(*args, "--json").stdout)


class TunnelLab:
    """Namespaces `hub`, devices and engineers, a gateway running the hub, agents on devices."""

    def __init__(
        self,
        workdir: Path,
        *,
        devices: Sequence[str] = ("dev1", "dev2"),
        engineers: Sequence[str] = ("eng1", "eng2"),
        network: str = "10.213.7.0/28",
        gateway_env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.net = NetLab()
        self.network = network
        self.gateway_env = dict(gateway_env or {})
        self.data_dir = workdir / "gateway"
        self.hub_interface = ""
        self.gateway: Process | None = None
        self.agents: dict[str, Process] = {}
        self.device_ids: dict[str, str] = {}
        self.agent_interfaces: dict[str, str] = {}
        self.links: dict[str, Any] = {}
        self.admin_token = ""
        self._gateway_runs = 0
        try:
            self._build(devices, engineers)
        except BaseException:
            self.close()
            raise

    # ---- the network ------------------------------------------------------------------------
    def _build(self, devices: Sequence[str], engineers: Sequence[str]) -> None:
        self.net.add_namespace("hub")
        for role in (*devices, *engineers):
            self.net.add_namespace(role)
            link = self.net.connect("hub", role)
            self.links[role] = link
            run_command(
                ["ip", "route", "add", f"{PUBLIC_IP}/32", "via", str(link.a_ip)],
                netns=self.ns(role),
            )
        run_command(["ip", "address", "add", f"{PUBLIC_IP}/32", "dev", "lo"], netns=self.ns("hub"))
        self.hub_interface = self.net.ifname("hub")

    def ns(self, role: str) -> str:
        return self.net.ns(role)

    # ---- the gateway ------------------------------------------------------------------------
    def start_gateway(self, timeout: float = 40.0) -> Process:
        self._gateway_runs += 1
        argv = [
            *edgefleet_argv(),
            "gateway",
            "run",
            "--data-dir",
            str(self.data_dir),
            "--http",
            f"0.0.0.0:{HTTP_PORT}",
            "--mqtt-port",
            str(MQTT_PORT),
            "--public-host",
            PUBLIC_IP,
            "--tunnel-hub",
            "--tunnel-endpoint",
            f"{PUBLIC_IP}:{HUB_PORT}",
            "--tunnel-interface",
            self.hub_interface,
            "--tunnel-network",
            self.network,
        ]
        log = self.workdir / f"gateway-{self._gateway_runs}.log"
        gateway = Process(self.ns("hub"), argv, log, env=self.gateway_env).start()
        self.gateway = gateway

        def healthy() -> bool:
            gateway.check_running()
            try:
                return ns_http(self.ns("hub"), "GET", f"{GATEWAY_URL}/healthz").is_success
            except httpx.HTTPError:
                return False

        try:
            wait_for(healthy, timeout=timeout, interval=0.1, what="the gateway to answer")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{gateway.log_tail()}") from exc
        if not self.admin_token:
            bootstrap = self.hub_cli("").json("admin", "create-token", "--data-dir", self.data_dir)
            hub = self.ns("hub")
            made = person_token(
                GATEWAY_URL,
                bootstrap["token"],
                "admin",
                post=lambda url, **kw: ns_http(hub, "POST", url, **kw),
            )
            self.admin_token = made["token"]
        return gateway

    def stop_gateway(self) -> int | None:
        assert self.gateway is not None
        return self.gateway.stop()

    def hub_cli(self, token: str | None = None) -> Cli:
        return Cli(self.ns("hub"), self.admin_token if token is None else token, self.workdir)

    def cli(self, role: str) -> Cli:
        cwd = self.workdir / role
        cwd.mkdir(exist_ok=True)
        return Cli(self.ns(role), self.admin_token, cwd)

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """The gateway's HTTP API as the admin, from the hub namespace."""
        response = ns_http(
            self.ns("hub"),
            method,
            f"{GATEWAY_URL}/api/v1{path}",
            headers={"Authorization": f"Bearer {self.admin_token}"},
            **kwargs,
        )
        response.raise_for_status()
        return response.json()

    def broker_endpoint(self) -> MqttEndpoint:
        """The gateway's own broker credential (inside the hub namespace: 127.0.0.1)."""
        return MqttEndpoint(
            host="127.0.0.1",
            port=MQTT_PORT,
            tls=True,
            username=GATEWAY_USERNAME,
            password=gateway_password_path(self.data_dir).read_text().strip(),
            ca_file=pki_directory(self.data_dir) / CA_CERT_NAME,
        )

    # ---- machines ---------------------------------------------------------------------------
    def enroll(self, role: str, token: str, netns_role: str | None = None) -> str:
        """`edgefleet agent enroll` from the device's namespace (or another, for a machine that
        never runs); returns its device id."""
        state = self.workdir / f"{role}-state"
        done = Cli(self.ns(netns_role or role), "", self.workdir).json(
            "agent",
            "enroll",
            "--gateway",
            GATEWAY_URL,
            "--token",
            token,
            "--name",
            role,
            "--state-dir",
            state,
        )
        self.device_ids[role] = done["device_id"]
        return str(done["device_id"])

    def start_agent(self, role: str, ports: Sequence[int], node_red: str | None = None) -> Process:
        interface = self.agent_interfaces.get(role) or self.net.ifname(role)
        self.agent_interfaces[role] = interface
        argv = [
            *edgefleet_argv(),
            "agent",
            "run",
            "--state-dir",
            str(self.workdir / f"{role}-state"),
            "--node-red",
            node_red or "http://127.0.0.1:1",
            "--allow-tunnels",
            "--tunnel-interface",
            interface,
            "--log-level",
            "debug",
        ]
        for port in ports:
            argv += ["--tunnel-port", str(port)]
        env = {"EDGEFLEET_AGENT_MAX_RECONNECT_DELAY": "2"}
        agent = Process(self.ns(role), argv, self.workdir / f"{role}-agent.log", env=env).start()
        self.agents[role] = agent
        return agent

    def wait_agent_connected(self, role: str, count: int = 1, timeout: float = 30.0) -> None:
        agent = self.agents[role]

        def connected() -> bool:
            agent.check_running()
            text = agent.log_path.read_text(errors="replace")
            return text.count("connected to the broker (session present") >= count

        try:
            wait_for(connected, timeout=timeout, what=f"agent {role} connected")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{agent.log_tail()}") from exc

    def agent_tunnel_up(self, role: str) -> bool:
        """Whether the device's tunnel interface exists."""
        return link_exists(self.agent_interfaces[role], netns=self.ns(role))

    # ---- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                agent.stop(timeout=10)
        if self.gateway is not None:
            with contextlib.suppress(Exception):
                self.gateway.stop()
        self.net.close()  # kills what is left in the namespaces (wireguard-go, mosquitto)
