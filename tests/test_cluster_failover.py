"""A cluster losing its leader, end to end: three real `edgefleet gateway run` replicas on one
PostgreSQL database and one Mosquitto, real agents beside real Node-REDs, a real WireGuard hub.

    replica 0, replica 1   this host's network namespace; replica 0 starts first and leads
    hub replica            `--tunnel-hub`, in its own namespace (its wireguard-go, nftables);
                           PostgreSQL over its Unix socket, the broker through a relay
    press-1..3             `edgefleet agent run` beside its own Node-RED, on this host
    tunnel device          `edgefleet agent run --allow-tunnels` in its own namespace, joined
                           to the hub's by a veth; the broker through a relay

Machines and operators reach the replicas through a small TCP load balancer (`Relay`) that skips
a replica that does not answer, as the one in front of a real cluster would. The singleton jobs
(rollout scheduler, tunnel reaper) run on the leader, the holder of a PostgreSQL advisory lock; a
test kills it with SIGKILL at a chosen moment and checks that another replica finishes the job
and that nothing is done twice. A replica killed by one test is started again (same data
directory, so the same MQTT session) before the next.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from edge_agent.enroll import enroll
from edge_agent.state import AgentState
from gateway.broker.mosquitto import MosquittoSupervisor
from gateway.commands.models import CommandRecord
from gateway.db import make_engine
from gateway.settings import GatewaySettings
from gateway.telemetry.models import batches
from gateway.tunnels import reaper
from gateway.tunnels.wireguard.firewall import HubFirewall
from provisioning.wireguard.keys import generate_keypair
from provisioning.wireguard.tools import link_exists, run_command, wg_show_dump
from provisioning.wireguard.wireguard_go import UAPI_DIR
from tests.conftest import fresh_pg_database
from tests.support.cluster import Cluster, replica_args
from tests.support.gateway_process import (
    GatewayProcess,
    edgefleet_command,
    spawn_agent,
    wait_until,
)
from tests.support.mosquitto import running_broker
from tests.support.netns import NetLab, leftover_namespaces, missing_requirements
from tests.support.node_red import NodeRedHandle, flows_for, get_flows, start_node_red
from tests.support.relay import Relay, Where
from tests.support.telemetry import stored_values
from tests.support.tunnel_lab import Process
from tests.support.waiting import free_port, wait_for

_REASON = missing_requirements()
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.netns,
    pytest.mark.nodered,
    pytest.mark.skipif(_REASON is not None, reason=f"netns test: {_REASON}"),
]

T = TypeVar("T")
PUBLIC_IP = "203.0.113.1"  # the hub's address, on its namespace's loopback
HUB_PORT = 51820
TUNNEL_NETWORK = "10.213.9.0/28"
TUNNEL_TTL = 6  # seconds
EXPIRY_BOUND = 4.0  # how late an expiry may be when the leader died at that moment
DEVICE_PORT = 8080
SAMPLES = 300  # numbered samples per machine in the ingest test
PER_POST = 10

# ---------------------------------------------------------------------------- the plumbing


def start_all(
    stack: ExitStack, managers: Sequence[AbstractContextManager[T]]
) -> Callable[[], list[T]]:
    """Enter context managers at once, each from a thread of its own (they mostly wait for a
    process to come up), and go on meanwhile; the function returned waits for them and gives
    what they entered (or raises the first failure). `stack` exits every one that was entered,
    also if the test never waited for them."""
    results: list[T | None] = [None] * len(managers)
    errors: list[BaseException] = []

    def enter(index: int) -> None:
        try:
            results[index] = managers[index].__enter__()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=enter, args=(n,)) for n in range(len(managers))]
    for thread in threads:
        thread.start()

    def join() -> None:
        for thread in threads:
            thread.join()

    def exit_entered() -> None:
        join()
        for manager, result in reversed(list(zip(managers, results, strict=True))):
            if result is not None:
                manager.__exit__(None, None, None)

    stack.callback(exit_entered)

    def wait() -> list[T]:
        join()
        if errors:
            raise errors[0]
        return [r for r in results if r is not None]

    return wait


def stays(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether `condition` holds throughout the next `seconds`: a watch over something that must
    not happen again (a second command), where there is no event to wait for."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(0.1)
    return condition()


def at(text: str) -> float:
    """Unix time of an ISO timestamp from the API."""
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


# ----------------------------------------------------------------------------- the parts


class Replica(GatewayProcess):
    """`edgefleet gateway run` on the cluster's database, optionally in a network namespace
    (whose loopback this host reaches through a relay on the same port)."""

    def __init__(
        self,
        data_dir: Path,
        extra_args: Sequence[str],
        *,
        http_port: int | None = None,
        netns: str | None = None,
    ) -> None:
        super().__init__(data_dir, http_port=http_port, extra_args=extra_args)
        self.netns = netns

    @property
    def argv(self) -> list[str]:
        argv = super().argv
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def again(self) -> Replica:
        """A new process for this replica: same data directory, port and arguments."""
        return Replica(self.data_dir, self.extra_args, http_port=self.http_port, netns=self.netns)

    def kill9(self) -> None:
        assert self.proc is not None and self.proc.poll() is None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.stop(check=False)  # closes the log; nothing else is left of it

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(f"edgefleet_telemetry_{name} "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def logged(self, text: str) -> int:
        return self.log_text().count(text)


class Machine:
    """`edgefleet agent run` beside its own Node-RED, with its telemetry intake on a free port."""

    def __init__(self, name: str, state_dir: Path, node_red: NodeRedHandle) -> None:
        self.name = name
        self.state_dir = state_dir
        self.node_red = node_red
        self.intake_port = free_port()
        self.log_path = state_dir.parent / f"{name}-agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.device_id = ""

    def start(self) -> None:
        env = {
            "EDGEFLEET_AGENT_TELEMETRY_INTAKE_PORT": str(self.intake_port),
            "EDGEFLEET_AGENT_HOST_METRICS_INTERVAL": "0",
            "EDGEFLEET_AGENT_OUTBOX_BATCH_SIZE": str(PER_POST),
            "EDGEFLEET_AGENT_MAX_RECONNECT_DELAY": "2",
        }
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = spawn_agent(self.state_dir, self._log, self.node_red.url, env=env, debug=True)

    def connected(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agent {self.name} exited:\n{self.log_tail()}")
        return "connected to the broker (session present" in self.log_text()

    def pause(self) -> None:
        """SIGSTOP: a machine that is slow to act on what it is sent."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def post(self, values: range) -> None:
        response = httpx.post(
            f"http://127.0.0.1:{self.intake_port}/telemetry",
            json={"samples": [{"m": "n", "v": float(v)} for v in values]},
            timeout=10,
        )
        assert response.status_code == 200, response.text

    def flows_started(self) -> int:
        """How often Node-RED (re)started its flows: once per deploy it took."""
        return self.node_red.log_path.read_text(errors="replace").count("Started flows")

    def commands_received(self, kind: str) -> int:
        """Commands of this kind in the agent's own command log (what reached the machine)."""
        return received(self.state_dir, kind)


def received(state_dir: Path, kind: str) -> int:
    with contextlib.closing(sqlite3.connect(state_dir / "commands.db")) as db:
        row = db.execute("SELECT count(*) FROM commands WHERE kind = ?", (kind,)).fetchone()
        return int(row[0])


class Lab:
    """The whole cluster; see the module's docstring."""

    def __init__(self, tmp: Path, db_url: str, broker: MosquittoSupervisor, net: NetLab) -> None:
        self.tmp = tmp
        self.db_url = db_url
        self.broker = broker
        self.net = net
        self.engine: Engine = make_engine(GatewaySettings(db_url=db_url).database_url)
        self.replicas: list[Replica] = []
        self.cluster = Cluster(self.replicas, broker)  # sees replicas replaced in this list
        self.relays: list[Relay] = []
        self.machines: list[Machine] = []
        self.tunnel_agent: Process | None = None
        self.tunnel_device = ""
        self.tunnel_state = tmp / "tunnel-device"
        self.hub_interface = net.ifname("hub")
        self.agent_interface = net.ifname("dev")
        self.lb_port = free_port()
        self.url = f"http://127.0.0.1:{self.lb_port}"
        self.admin_token = ""

    # ---- building it ------------------------------------------------------------------------
    def build_network(self) -> None:
        net = self.net
        for role in ("hub", "dev"):
            net.add_namespace(role)
        link = net.connect("hub", "dev")
        run_command(["ip", "address", "add", f"{PUBLIC_IP}/32", "dev", "lo"], netns=net.ns("hub"))
        route = ["ip", "route", "add", f"{PUBLIC_IP}/32", "via", str(link.a_ip)]
        run_command(route, netns=net.ns("dev"))
        # The broker (and, for the device, the load balancer) at the same loopback address and
        # port inside the namespaces as here: the addresses the gateway hands out work there.
        for role in ("hub", "dev"):
            self.relays.append(
                Relay(
                    (net.ns(role), "127.0.0.1", self.broker.port),
                    [(None, "127.0.0.1", self.broker.port)],
                )
            )
        self.relays.append(
            Relay((net.ns("dev"), "127.0.0.1", self.lb_port), [(None, "127.0.0.1", self.lb_port)])
        )

    def replica(self, index: int, *, hub: bool = False) -> Replica:
        args = replica_args(self.tmp, self.db_url, self.broker)
        if not hub:
            return Replica(self.tmp / f"replica-{index}", args)
        # PostgreSQL listens on this host's loopback; its Unix socket reaches any namespace.
        database = self.db_url.rsplit("/", 1)[1]
        args[args.index("--db") + 1] = f"postgresql://postgres@/{database}?host=/var/run/postgresql"
        args += [
            "--tunnel-hub",
            "--tunnel-endpoint",
            f"{PUBLIC_IP}:{HUB_PORT}",
            "--tunnel-listen-port",
            str(HUB_PORT),
            "--tunnel-interface",
            self.hub_interface,
            "--tunnel-network",
            TUNNEL_NETWORK,
        ]
        replica = Replica(self.tmp / f"replica-{index}", args, netns=self.net.ns("hub"))
        # Its HTTP port, inside its namespace, at the same port here.
        target = (self.net.ns("hub"), "127.0.0.1", replica.http_port)
        self.relays.append(Relay((None, "127.0.0.1", replica.http_port), [target]))
        return replica

    def start_load_balancer(self) -> None:
        # Straight to each replica in its own namespace (not through the hub's relay, which
        # accepts even when the replica behind it is down), so a dead replica is skipped.
        targets: list[Where] = [(r.netns, "127.0.0.1", r.http_port) for r in self.replicas]
        self.relays.append(Relay((None, "127.0.0.1", self.lb_port), targets))

    def enroll(self, name: str, state_dir: Path, token: str) -> str:
        """What `edgefleet agent enroll` does (through the load balancer), in this process."""
        return enroll(self.url, token, AgentState(state_dir), name=name).device_id

    def start_tunnel_agent(self) -> None:
        argv = [
            *edgefleet_command(),
            "agent",
            "run",
            "--state-dir",
            str(self.tunnel_state),
            "--node-red",
            "http://127.0.0.1:1",
            "--allow-tunnels",
            "--tunnel-port",
            str(DEVICE_PORT),
            "--tunnel-interface",
            self.agent_interface,
            "--log-level",
            "debug",
        ]
        env = {
            "EDGEFLEET_AGENT_MAX_RECONNECT_DELAY": "2",
            "EDGEFLEET_AGENT_HOST_METRICS_INTERVAL": "0",
        }
        log = self.tmp / "tunnel-device-agent.log"
        self.tunnel_agent = Process(self.net.ns("dev"), argv, log, env=env).start()

    def tunnel_agent_connected(self) -> bool:
        assert self.tunnel_agent is not None
        self.tunnel_agent.check_running()
        text = self.tunnel_agent.log_path.read_text(errors="replace")
        return "connected to the broker (session present" in text

    # ---- using it ---------------------------------------------------------------------------
    @property
    def hub(self) -> Replica:
        return next(r for r in self.replicas if r.netns is not None)

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """The HTTP API through the load balancer, as the admin."""
        response = httpx.request(
            method,
            f"{self.url}/api/v1{path}",
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=30,
            **kwargs,
        )
        assert response.is_success, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def wait(self, condition: Callable[[], T | None], what: str, timeout: float = 20) -> T:
        """`wait_until` whose failure shows every replica's and agent's log."""
        return wait_until(condition, what, *self.replicas, *self.machines, timeout=timeout)

    def ensure_running(self) -> None:
        """Start again any replica a test killed (same data directory, same MQTT session)."""
        for index, replica in enumerate(self.replicas):
            if not replica.running:
                replica.stop(check=False)
                self.replicas[index] = replica.again().start()
        self.cluster.wait_for_leader()

    def leader_not_the_hub(self) -> Replica:
        """The leader, made to be a replica other than the hub's if need be (the hub is restarted
        gracefully: it resigns and another replica takes the lock)."""
        leader = self.cluster.wait_for_leader()
        if leader is self.hub:
            index = self.replicas.index(leader)
            leader.stop()
            wait_for(
                lambda: self.cluster.leader(), timeout=10, what="a leader after the hub resigned"
            )
            self.replicas[index] = leader.again().start()
            leader = self.cluster.wait_for_leader()
        assert isinstance(leader, Replica) and leader is not self.hub
        return leader

    def commands(self, ref: str, kind: str) -> list[str]:
        """Device ids of the stored commands of `kind` about `ref`, one entry per command."""
        table = CommandRecord.__table__  # type: ignore[attr-defined]
        query = sa.select(table.c.device_id).where(table.c.ref == ref, table.c.kind == kind)
        with self.engine.connect() as conn:
            return sorted(conn.execute(query).scalars())

    def audit(self, target: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.api("GET", "/audit", params={"target": target})
        return events

    def since(self, metric: str, before: Sequence[float]) -> list[float]:
        """How much each replica's telemetry counter grew since `before`."""
        now = [r.metric(metric) for r in self.replicas]
        return [n - b for n, b in zip(now, before, strict=True)]

    def batches_stored(self, device_ids: Sequence[str]) -> int:
        query = sa.select(sa.func.count()).where(batches.c.device_id.in_(list(device_ids)))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, pg_template: str) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("cluster-failover")
    net = NetLab()
    with ExitStack() as stack:
        stack.callback(lambda: assert_nothing_left(net))
        stack.callback(net.close)
        db_url = stack.enter_context(fresh_pg_database(pg_template))
        broker = stack.enter_context(running_broker())
        built = Lab(tmp, db_url, broker, net)
        stack.callback(built.engine.dispose)

        def close_relays() -> None:
            for relay in built.relays:
                relay.close()

        stack.callback(close_relays)
        node_reds = start_all(stack, [start_node_red(tmp / f"node-red-{n}") for n in range(3)])
        built.build_network()
        # Replica 0 first: it takes the leader lock before the hub's replica exists.
        first = stack.enter_context(built.replica(0))
        built.replicas.append(first)
        built.admin_token = first.admin_token
        assert built.cluster.wait_for_leader() is first
        built.replicas += start_all(stack, [built.replica(1), built.replica(2, hub=True)])()
        stack.callback(lambda: [r.stop(check=False) for r in built.replicas])
        built.start_load_balancer()

        token = built.api("POST", "/provisioning-tokens", json={"uses": 4})["token"]
        to_enroll = [(f"press-{n}", tmp / f"press-{n}") for n in (1, 2, 3)]
        to_enroll.append(("tunnel-device", built.tunnel_state))
        *ids, built.tunnel_device = [built.enroll(name, path, token) for name, path in to_enroll]
        built.machines = [
            Machine(name, path, handle)
            for (name, path), handle in zip(to_enroll[:3], node_reds(), strict=True)
        ]
        for machine, device_id in zip(built.machines, ids, strict=True):
            machine.device_id = device_id
            stack.callback(machine.stop)
            machine.start()
        built.start_tunnel_agent()
        stack.callback(lambda: built.tunnel_agent.stop() if built.tunnel_agent else None)
        for machine in built.machines:
            built.wait(machine.connected, f"{machine.name} connected")
        built.wait(built.tunnel_agent_connected, "the tunnel device connected")
        yield built


def assert_nothing_left(net: NetLab) -> None:
    assert leftover_namespaces(net.prefix) == []
    assert not [n for n in net.wg_names if (UAPI_DIR / f"{n}.sock").exists()]


@pytest.fixture(autouse=True)
def three_replicas(lab: Lab) -> Lab:
    """Each test starts with all three replicas running and a leader among them."""
    lab.ensure_running()
    assert all(r.running for r in lab.replicas) and len(lab.replicas) == 3
    return lab


# ------------------------------------------------------------------------------------ tests


def test_ingest_is_shared_by_the_three_replicas_and_stores_every_sample_once(lab: Lab) -> None:
    devices = [m.device_id for m in lab.machines]
    stored_before = [r.metric("batches_stored_total") for r in lab.replicas]
    received_before = [r.metric("messages_received_total") for r in lab.replicas]
    rows_before = lab.batches_stored(devices)

    def stream(machine: Machine) -> None:
        for first in range(0, SAMPLES, PER_POST):
            machine.post(range(first, first + PER_POST))

    with ThreadPoolExecutor(len(lab.machines)) as pool:
        list(pool.map(stream, lab.machines))  # raises what a post raised

    def all_stored() -> bool:
        return all(len(stored_values(lab.engine, d)) >= SAMPLES for d in devices)

    def shares() -> list[float] | None:
        share = lab.since("batches_stored_total", stored_before)
        return share if sum(share) == lab.batches_stored(devices) - rows_before else None

    lab.wait(all_stored, f"{SAMPLES} samples of each machine stored")
    # Every replica committed a share, and the shares add up to the stored batches: each batch
    # was written by exactly one replica.
    share = lab.wait(shares, "the replicas' counters to add up to the stored batches")
    assert all(n > 0 for n in share), f"a replica got no share: {share}"
    assert sum(share) >= len(devices) * SAMPLES // PER_POST, share  # batches hold <= PER_POST
    # Split, not copied: the broker gave each message to one replica only.
    got = lab.since("messages_received_total", received_before)
    assert got == share, f"messages received {got}, batches stored {share}"
    # The stream is complete and unique: every numbered sample exactly once.
    for device in devices:
        assert stored_values(lab.engine, device) == [float(v) for v in range(SAMPLES)], device


def test_tunnel_expires_on_time_and_once_when_the_leader_dies_at_its_end(lab: Lab) -> None:
    leader = lab.leader_not_the_hub()
    hub = lab.hub
    before_close = received(lab.tunnel_state, "tunnel.close")
    engineer = generate_keypair()
    opened = lab.api(
        "POST",
        "/tunnels",
        json={
            "device_id": lab.tunnel_device,
            "ports": [DEVICE_PORT],
            "ttl_seconds": TUNNEL_TTL,
            "reason": "cluster failover test",
            "engineer_public_key": engineer.public_key,
        },
    )
    tunnel_id, expires_at = opened["id"], at(opened["expires_at"])
    assert opened["state"] == "open", opened  # the device's WireGuard is up, the hub saw it
    assert expires_at - time.time() > 1.0, "the open took too long; nothing would be tested"
    hub_ns = lab.net.ns("hub")
    assert len(wg_show_dump(lab.hub_interface, netns=hub_ns).peers) == 2  # device + engineer
    assert tunnel_id in HubFirewall(lab.hub_interface, netns=hub_ns).installed()

    # The leader runs the tunnel reaper; it dies a moment before the tunnel's end (the reaper
    # ends only tunnels whose end has passed), so the expiry falls in the failover and only
    # another replica can do it.
    assert lab.cluster.leader() is leader
    wait_for(lambda: time.time() >= expires_at - 0.3, timeout=TUNNEL_TTL + 5, interval=0.01)
    leader.kill9()
    assert time.time() < expires_at, "the leader was killed too late; nothing would be tested"

    successor = lab.cluster.wait_for_leader(timeout=10)
    assert successor is not leader and successor.running
    expired = lab.wait(
        lambda: (t := lab.api("GET", f"/tunnels/{tunnel_id}"))["state"] == "expired" and t,
        "the tunnel to expire",
        timeout=15,
    )
    late = at(expired["closed_at"]) - expires_at
    assert 0 <= late <= EXPIRY_BOUND, f"expired {late:.2f}s after its end"
    assert expired["closed_by"] == "gateway"
    assert f"reached the end of its {TUNNEL_TTL}s lifetime" in expired["close_reason"]
    # The hub (a replica that stayed up) took its peers and rules off.
    assert wg_show_dump(lab.hub_interface, netns=hub_ns).peers == {}
    assert tunnel_id not in HubFirewall(lab.hub_interface, netns=hub_ns).installed()
    assert hub.running

    # Told to the device once, and confirmed by it.
    confirmed = lab.wait(
        lambda: (t := lab.api("GET", f"/tunnels/{tunnel_id}"))["device_closed_at"] and t,
        "the device to confirm the close",
    )
    assert confirmed["state"] == "expired"
    assert not link_exists(lab.agent_interface, netns=lab.net.ns("dev"))  # its side is gone
    # ... and not again: watched over two more runs of the (new) leader's reaper.
    told_once = stays(
        lambda: (
            lab.commands(tunnel_id, "tunnel.close") == [lab.tunnel_device]
            and received(lab.tunnel_state, "tunnel.close") == before_close + 1
        ),
        seconds=2 * reaper.INTERVAL + 0.5,
    )
    assert told_once, (
        lab.commands(tunnel_id, "tunnel.close"),
        received(lab.tunnel_state, "tunnel.close"),
    )
    # One expiry in the audit log, and no other ending.
    events = [e for e in lab.audit(lab.tunnel_device) if e["detail"].get("tunnel_id") == tunnel_id]
    endings = [e["action"] for e in events if e["action"] in ("tunnel.expire", "tunnel.close")]
    assert endings == ["tunnel.expire"], events
    assert not leader.running


FLOWS_LABEL = "cluster-failover"


def test_rollout_finishes_once_when_the_leader_dies_mid_wave(lab: Lab) -> None:
    leader = lab.cluster.wait_for_leader()
    assert isinstance(leader, Replica)
    machines = {m.device_id: m for m in lab.machines}
    started = {d: m.flows_started() for d, m in machines.items()}
    deploys = {d: m.commands_received("deploy") for d, m in machines.items()}
    flows = flows_for(FLOWS_LABEL)
    release = lab.api("POST", "/flows/releases", json={"flows_json": json.dumps(flows)})
    for machine in lab.machines:
        machine.pause()
    try:
        deployment = lab.api(
            "POST",
            "/deployments",
            json={
                "release": release["digest"],
                "to": {"devices": list(machines)},
                "canary": "1",
                "wave": "1",
                "timeout_seconds": 60,
            },
        )
        deployment_id = deployment["id"]
        wave_of = {d["device_id"]: d["wave"] for d in deployment["devices"]}
        assert sorted(wave_of.values()) == [0, 1, 2]
        by_wave = {wave: machines[device] for device, wave in wave_of.items()}
        by_wave[0].resume()  # the canary deploys; the next machine is sent its command but sits

        def show() -> dict[str, Any]:
            state: dict[str, Any] = lab.api("GET", f"/deployments/{deployment_id}")
            return state

        def device(state: dict[str, Any], wave: int) -> dict[str, Any]:
            return next(d for d in state["devices"] if d["wave"] == wave)

        mid = lab.wait(
            lambda: (s := show()) and device(s, 1)["command_id"] and s,
            "wave 2 of 3 sent",
        )
        # Mid-rollout: wave 1 done, wave 2 sent (and its command id noted), wave 3 pending.
        assert [device(mid, w)["state"] for w in range(3)] == ["succeeded", "sent", "pending"]
        assert mid["state"] == "running"
        assert lab.cluster.leader() is leader
        leader.kill9()
        # The machine acts on its command only once another replica leads: the successor
        # inherits a wave in flight, which it must wait for, not send again.
        successor = lab.cluster.wait_for_leader(timeout=10)
        assert successor is not leader
        assert show()["devices"] == mid["devices"]
    finally:
        for machine in lab.machines:
            machine.resume()

    final = lab.wait(
        lambda: (s := show())["state"] != "running" and s, "the deployment to end", timeout=30
    )
    assert final["state"] == "succeeded", final
    assert final["counts"] == {"succeeded": 3}
    # Each device was sent the release once: one command on the gateway's side, one received by
    # the agent, one deploy taken by its Node-RED, whose flows are the release's.
    assert lab.commands(deployment_id, "deploy") == sorted(machines)
    for device_id, machine in machines.items():
        assert machine.commands_received("deploy") == deploys[device_id] + 1, machine.name
        assert machine.flows_started() == started[device_id] + 1, machine.name
        assert get_flows(machine.node_red)[1] == flows, machine.name
    # The leader that died sent waves 1 and 2; the successor sent wave 3 and ended it, once.
    wave_line = f"deployment {deployment_id}: sending wave"
    assert leader.logged(f"{wave_line} 2/3") == 1 and leader.logged(f"{wave_line} 3/3") == 0
    alive = [r for r in lab.replicas if r.running]
    assert [r.logged(f"{wave_line} 3/3") for r in alive].count(1) == 1
    assert successor.logged(f"{wave_line} 3/3") == 1
    actions = [e["action"] for e in lab.audit(deployment_id)]
    assert sorted(actions) == ["flows.deploy", "flows.finish"], actions
    finish = next(e for e in lab.audit(deployment_id) if e["action"] == "flows.finish")
    assert finish["detail"]["state"] == "succeeded" and finish["actor"] == "gateway"
