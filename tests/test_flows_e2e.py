"""Pushing flows end to end: a real `edgefleet gateway run` (SQLite, the Mosquitto it supervises),
three real `edgefleet agent run` processes each beside its own real Node-RED (one with adminAuth),
and the operator's `edgefleet flows ...` / `deployments ...` commands.

Every Node-RED runs with its npm registry pointing at a closed port, so a module install that
works did so from the gateway's module cache, with no route to any registry. The machines keep
their state from one test to the next, as machines do: each test starts from whatever flows the
last one left and says what it expects to change.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from edge_agent.node_red import NodeRedClient
from gateway.identity import GatewayIdentity
from provisioning import keys
from provisioning.bundles import Bundle
from provisioning.deploy_command import DeployArgs
from provisioning.jwt_rules import sign_command
from provisioning.states import CommandKind
from tests.support import local_http
from tests.support.gateway_process import (
    START_TIMEOUT_S,
    GatewayProcess,
    clean_env,
    edgefleet_command,
    run_edgefleet,
    spawn_agent,
    wait_until,
)
from tests.support.mosquitto import MqttProbe
from tests.support.node_red import NodeRedHandle, flows_for, get_flows, set_flows, start_node_red
from tests.support.waiting import free_port
from tests.test_node_red_deployer import make_module_tarball

pytestmark = pytest.mark.nodered

ADMIN_PASSWORD = "plant-3 secret"
NAMES = ("press-1", "press-2", "press-3")


def enroll(gateway: GatewayProcess, token: str, name: str, state_dir: Path) -> str:
    """`edgefleet agent enroll` a machine into `state_dir`; its device id."""
    done = run_edgefleet(
        "agent",
        "enroll",
        "--gateway",
        gateway.url,
        "--token",
        token,
        "--name",
        name,
        "--state-dir",
        state_dir,
        "--json",
    )
    return str(json.loads(done.stdout)["device_id"])


class Machine:
    """One machine: a Node-RED and an `edgefleet agent run` process beside it."""

    def __init__(self, name: str, state_dir: Path, node_red: NodeRedHandle) -> None:
        self.name = name
        self.state_dir = state_dir
        self.node_red = node_red
        self.log_path = state_dir.parent / f"{name}-agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.device_id = ""

    def start(self) -> None:
        self.wait_connected(self.launch())

    def launch(self) -> int:
        """Start `edgefleet agent run`; return how often it had connected before (for
        `wait_connected`), so several machines can start at once and be waited for after."""
        env = {"EDGEFLEET_AGENT_TELEMETRY_INTAKE": "false"}  # three agents on one host
        if self.node_red.password is not None:
            assert self.node_red.username is not None
            env["EDGEFLEET_AGENT_NODE_RED_USERNAME"] = self.node_red.username
            env["EDGEFLEET_AGENT_NODE_RED_PASSWORD"] = self.node_red.password
        connects = self.connects()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = spawn_agent(self.state_dir, self._log, self.node_red.url, env=env, debug=True)
        return connects

    def wait_connected(self, connects_before: int) -> None:
        wait_until(lambda: self.connects() > connects_before, f"agent {self.name} to connect", self)

    def connects(self) -> int:
        return self.log_text().count("connected to the broker (session present")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def flows(self) -> list[dict[str, Any]]:
        return get_flows(self.node_red)[1]

    def deploys_seen(self) -> int:
        """How often Node-RED (re)started its flows: once per deploy it accepted."""
        return self.node_red.log_path.read_text(errors="replace").count("Started flows")

    def deploy_commands_received(self) -> int:
        """Deploy commands in the agent's own command log (what reached the machine)."""
        with sqlite3.connect(self.state_dir / "commands.db") as db:
            row = db.execute("SELECT count(*) FROM commands WHERE kind = ?", ("deploy",))
            return int(row.fetchone()[0])


class Fleet:
    def __init__(self, gateway: GatewayProcess, machines: list[Machine], tmp: Path) -> None:
        self.gateway = gateway
        self.machines = machines
        self.tmp = tmp
        self.http = httpx.Client(
            base_url=gateway.url + "/api/v1",
            headers={"Authorization": f"Bearer {gateway.admin_token}"},
            timeout=10,
        )

    def write_flows(self, name: str, flows: list[dict[str, Any]] | str) -> Path:
        path = self.tmp / f"{name}.json"
        path.write_text(flows if isinstance(flows, str) else json.dumps(flows, indent=2))
        return path

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        response = self.http.get(f"/deployments/{deployment_id}")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def wait(
        self,
        deployment_id: str,
        condition: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float = 30,
    ) -> dict[str, Any]:
        def met() -> dict[str, Any] | None:
            state = self.deployment(deployment_id)
            return state if condition(state) else None

        return wait_until(met, what, self.gateway, *self.machines, timeout=timeout)

    def wait_done(self, deployment_id: str, timeout: float = 30) -> dict[str, Any]:
        return self.wait(
            deployment_id,
            lambda d: (
                d["state"] != "running"
                and all(x["state"] in FINAL for x in d["devices"] if x["state"] != "pending")
            ),
            f"deployment {deployment_id} to end",
            timeout,
        )

    def push_json(self, *args: str | Path) -> dict[str, Any]:
        deployment: dict[str, Any] = self.gateway.cli_json("flows", "push", *args)
        return deployment


FINAL = {"succeeded", "failed", "rolled_back", "drift", "cancelled"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("flows-e2e")
    dead_registry = f"http://127.0.0.1:{free_port()}/"
    no_registry = {"npm_config_registry": dead_registry, "NPM_CONFIG_REGISTRY": dead_registry}
    with ExitStack() as stack, ThreadPoolExecutor(3) as pool:
        # The three Node-REDs start in the background while the gateway starts and the
        # machines enroll (nothing of that needs Node-RED); each one that came up is stopped
        # (last, after the agents and the gateway), also when another part failed.
        node_reds = stack.enter_context(ExitStack())
        starting = [
            pool.submit(
                node_reds.enter_context,
                start_node_red(
                    tmp / f"node-red-{index}",
                    admin_password=ADMIN_PASSWORD if index == 2 else None,
                    env=no_registry,
                ),
            )
            for index in range(3)
        ]
        gateway = GatewayProcess(tmp / "gateway")
        # Twice the usual time to come up: it starts beside three Node-REDs on a small host.
        gateway.start(timeout=2 * START_TIMEOUT_S)
        stack.callback(gateway.stop)
        line_a = gateway.create_provisioning_token("--uses", "2", "--tag", "site=plant-3,line=A")[
            "token"
        ]
        line_b = gateway.create_provisioning_token("--uses", "1", "--tag", "site=plant-3,line=B")[
            "token"
        ]
        with ThreadPoolExecutor(3) as enrolling:  # the three machines enroll at once
            device_ids = list(
                enrolling.map(
                    lambda name, token: enroll(gateway, token, name, tmp / name),
                    NAMES,
                    (line_a, line_a, line_b),
                )
            )
        machines = []
        for name, device_id, node_red in zip(NAMES, device_ids, starting, strict=True):
            machine = Machine(name, tmp / name, node_red.result())
            machine.device_id = device_id
            stack.callback(machine.stop)
            machines.append(machine)
        launched = [machine.launch() for machine in machines]
        for machine, connects_before in zip(machines, launched, strict=True):
            machine.wait_connected(connects_before)
        fleet = Fleet(gateway, machines, tmp)
        stack.callback(fleet.http.close)
        yield fleet


def test_push_to_three_agents_and_read_the_flows_back_from_each_node_red(fleet: Fleet) -> None:
    flows = flows_for("release-a")
    path = fleet.write_flows("release-a", flows)
    # The live display (not a terminal here: it prints a line per change) until the end.
    done = fleet.gateway.cli("flows", "push", path, "--to", "site=plant-3", "--timeout", "2m")
    assert "succeeded 3" in done.stdout, done.stdout
    deployment_id = done.stdout.split()[1].rstrip(":")
    state = fleet.deployment(deployment_id)
    assert state["state"] == "succeeded" and state["counts"] == {"succeeded": 3}
    digest = Bundle.create(json.dumps(flows)).digest
    assert state["release"] == digest
    for machine in fleet.machines:
        rev, running = get_flows(machine.node_red)
        assert running == flows, machine.name
        record = next(d for d in state["devices"] if d["device_id"] == machine.device_id)
        assert record["rev"] == rev and record["seconds"] is not None
        assert record["sent_at"] <= record["started_at"] <= record["finished_at"]

    shown = fleet.gateway.cli_json("deployments", "show", deployment_id)
    assert {d["device_id"]: d["state"] for d in shown["devices"]} == {
        m.device_id: "succeeded" for m in fleet.machines
    }
    listed = fleet.gateway.cli_json("deployments", "list")
    assert listed[0]["id"] == deployment_id and listed[0]["counts"] == {"succeeded": 3}
    table = fleet.gateway.cli("deployments", "show", deployment_id).stdout
    assert all(name in table for name in NAMES) and "succeeded" in table


def test_a_release_that_fails_on_the_machine_is_rolled_back_and_reported(fleet: Fleet) -> None:
    machine = fleet.machines[0]
    before = machine.flows()
    path = fleet.write_flows("unknown-type", flows_for("broken", "acme-not-installed"))
    made = fleet.gateway.cli("flows", "release", path, "--notes", "needs a module we lack")
    assert "acme-not-installed" in made.stderr and "warning:" in made.stderr
    digest = made.stdout.strip()
    deployment = fleet.push_json(digest[:16], "--to", machine.device_id)
    assert deployment["release"] == digest

    final = fleet.wait_done(deployment["id"])
    [device] = final["devices"]
    assert device["state"] == "rolled_back", device
    assert (
        "acme-not-installed" in device["error"]
        and "restored the previous flows" in (device["error"])
    )
    assert final["state"] == "aborted"
    assert machine.flows() == before


def test_a_canary_failure_stops_the_rollout_before_the_second_wave(fleet: Fleet) -> None:
    received = {m.device_id: m.deploy_commands_received() for m in fleet.machines}
    flows_before = {m.device_id: m.flows() for m in fleet.machines}
    path = fleet.write_flows("canary", flows_for("canary", "acme-not-installed-either"))
    done = fleet.gateway.cli(
        "flows", "push", path, "--to", "all", "--canary", "1", "--wave", "1", check=False
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "aborted" in done.stderr and "failing:" in done.stdout
    assert "rolled_back: Node-RED has no node type(s) acme-not-installed-either" in done.stdout

    deployment_id = done.stdout.split()[1].rstrip(":")
    state = fleet.wait_done(deployment_id)
    assert state["state"] == "aborted" and state["wave_count"] == 3
    canary = next(d for d in state["devices"] if d["wave"] == 0)
    assert canary["state"] == "rolled_back"
    for device in state["devices"]:
        if device["wave"] > 0:
            assert device["state"] == "pending" and device["command_id"] is None, device
    for machine in fleet.machines:
        got = machine.deploy_commands_received() - received[machine.device_id]
        assert got == (1 if machine.device_id == canary["device_id"] else 0), machine.name
        assert machine.flows() == flows_before[machine.device_id]


def test_drift_on_the_machine_is_reported_and_overwritten_only_with_force(fleet: Fleet) -> None:
    machine = fleet.machines[1]
    baseline = fleet.write_flows("before-drift", flows_for("before-drift"))
    assert fleet.wait_done(fleet.push_json(baseline, "--to", machine.device_id)["id"])["state"] == (
        "succeeded"
    )  # the agent has deployed here, so it knows which rev it wrote
    edited = flows_for("edited-at-the-machine")
    set_flows(machine.node_red, edited)  # someone deploys from the editor on the machine
    path = fleet.write_flows("release-c", flows_for("release-c"))

    drifted = fleet.wait_done(fleet.push_json(path, "--to", machine.device_id)["id"])
    [device] = drifted["devices"]
    assert device["state"] == "drift"
    assert "changed on the machine" in device["error"] and "force" in device["error"]
    assert machine.flows() == edited

    # Forced, and followed on a terminal: the live display redraws itself in place.
    code, shown = run_on_terminal(
        fleet, "flows", "push", path, "--to", machine.device_id, "--force"
    )
    assert code == 0, shown
    assert "\x1b[" in shown and "F\x1b[J" in shown  # cursor up, clear below: a redraw
    assert "succeeded 1" in shown
    forced = fleet.deployment(shown.split()[1].rstrip(":"))
    assert forced["state"] == "succeeded" and forced["force"] is True, forced
    assert machine.flows() == flows_for("release-c")


def run_on_terminal(fleet: Fleet, *args: str | Path) -> tuple[int, str]:
    """Run `edgefleet ARGS` with a pseudo-terminal as its stdout; (exit code, what it showed)."""
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            [*edgefleet_command(), *(str(a) for a in args)],
            env=clean_env(fleet.gateway.env()),
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    return done.returncode, b"".join(chunks).decode(errors="replace") + done.stderr.decode()


def test_modules_install_from_the_gateways_cache_with_no_registry_reachable(
    fleet: Fleet, tmp_path: Path
) -> None:
    machine = fleet.machines[2]  # the Node-RED with adminAuth
    name, node_type = "node-red-contrib-edgefleet-e2e", "edgefleet-e2e"
    tarball = make_module_tarball(tmp_path, name, node_type, "1.0.0")
    flows = flows_for("with-module", node_type)
    path = fleet.write_flows("with-module", flows)

    deployment = fleet.push_json(path, "--module-tarball", tarball, "--to", "line=B")
    final = fleet.wait_done(deployment["id"], timeout=60)
    assert final["state"] == "succeeded", final
    assert [d["device_id"] for d in final["devices"]] == [machine.device_id]
    node_red = machine.node_red
    with NodeRedClient(node_red.url, node_red.username, node_red.password) as client:
        assert client.list_modules()[name] == "1.0.0"
        assert node_type in client.list_node_types()
    assert machine.flows() == flows
    cached = fleet.gateway.cli_json("flows", "module", "list")
    assert [(m["name"], m["node_types"]) for m in cached] == [(name, [node_type])]


def test_an_offline_machine_gets_the_deployment_when_it_is_back(fleet: Fleet) -> None:
    """Pushed while the machine is off; the operator detaches the live display with Ctrl-C; the
    machine applies the release when it is back."""
    machine = fleet.machines[1]
    before = machine.flows()
    machine.stop()
    path = fleet.write_flows("release-d", flows_for("release-d"))
    push = subprocess.Popen(
        [*edgefleet_command(), "flows", "push", str(path), "--to", machine.device_id],
        env=clean_env(fleet.gateway.env()),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert push.stdout is not None
        first = push.stdout.readline()  # "deployment dep-...: release ... to ..."
        deployment_id = first.split()[1].rstrip(":")
        fleet.wait(
            deployment_id,
            lambda d: d["devices"][0]["state"] == "sent" and d["devices"][0]["command_id"],
            "the command sent to the offline machine",
        )
        push.send_signal(signal.SIGINT)
        out, err = push.communicate(timeout=15)
    finally:
        if push.poll() is None:
            push.kill()
            push.wait()
    assert push.returncode == 0, err
    assert f"detached; deployment {deployment_id} goes on" in out
    assert fleet.deployment(deployment_id)["state"] == "running"
    assert machine.flows() == before

    machine.start()
    final = fleet.wait_done(deployment_id)
    assert final["state"] == "succeeded", final
    assert machine.flows() == flows_for("release-d")


def test_a_cancelled_deployment_is_not_applied_by_a_machine_that_comes_back(
    fleet: Fleet,
) -> None:
    machine = fleet.machines[1]
    before = machine.flows()
    machine.stop()
    path = fleet.write_flows("release-never", flows_for("release-never"))
    deployment = fleet.push_json(path, "--to", machine.device_id)
    fleet.wait(deployment["id"], lambda d: d["devices"][0]["command_id"], "the command sent")
    cancelled = fleet.gateway.cli_json("deployments", "cancel", deployment["id"])
    assert cancelled["state"] == "cancelled"

    machine.start()
    final = fleet.wait(
        deployment["id"],
        lambda d: "not applied" in (d["devices"][0]["error"] or ""),
        "the machine to report it did not apply the cancelled deployment",
    )
    assert final["devices"][0]["state"] == "cancelled"
    assert machine.flows() == before


def _gateway_signer(fleet: Fleet) -> tuple[GatewayIdentity, str]:
    identity = GatewayIdentity.load_or_create(fleet.gateway.data_dir / "signing-key.pem")
    gateway_id = local_http.get(fleet.gateway.url + "/healthz", timeout=5).json()["gateway_id"]
    return identity, gateway_id


def _replies(probe: MqttProbe, device_id: str) -> list[dict[str, Any]]:
    return [json.loads(p) for p in probe.received(f"fleet/{device_id}/reply")]


def test_the_same_command_twice_deploys_once_and_reports_the_same_result(fleet: Fleet) -> None:
    machine = fleet.machines[0]
    path = fleet.write_flows("release-e", flows_for("release-e"))
    deployment = fleet.push_json(path, "--to", machine.device_id)
    first = fleet.wait_done(deployment["id"])["devices"][0]
    assert first["state"] == "succeeded"
    deploys = machine.deploys_seen()

    identity, gateway_id = _gateway_signer(fleet)
    args = DeployArgs(deployment_id=deployment["id"], release=deployment["release"])
    command_id, token = sign_command(
        identity.private_key,
        gateway_id=gateway_id,
        device_id=machine.device_id,
        kind=CommandKind.deploy,
        args=args.model_dump(),
        lifetime=300,
    )
    with MqttProbe(fleet.gateway.broker_endpoint(), "e2e-duplicates") as probe:
        assert not probe.connect().is_failure
        assert not probe.subscribe("$share/e2e/fleet/+/reply").is_failure
        for _ in range(2):  # a QoS 1 redelivery, or a resend of the very same command
            assert not probe.publish(f"fleet/{machine.device_id}/cmd", token).is_failure

        def answers_to_ours() -> list[dict[str, Any]] | None:
            got = [r for r in _replies(probe, machine.device_id) if r["command_id"] == command_id]
            return got if len(got) >= 2 else None

        answers = wait_until(answers_to_ours, "two answers to the repeated command", machine)
    assert [a["state"] for a in answers] == ["succeeded", "succeeded"]
    assert {a["data"]["rev"] for a in answers} == {first["rev"]}
    assert "seen before" in machine.log_text()
    assert machine.deploys_seen() == deploys  # Node-RED was not deployed again
    assert fleet.deployment(deployment["id"])["devices"][0]["command_id"] == first["command_id"]


def test_a_forged_or_expired_deploy_command_is_refused_and_nothing_changes(
    fleet: Fleet,
) -> None:
    machine = fleet.machines[0]
    rev_before, flows_before = get_flows(machine.node_red)
    deploys = machine.deploys_seen()
    received = machine.deploy_commands_received()
    made = fleet.gateway.cli_json(
        "flows", "release", fleet.write_flows("release-f", flows_for("release-f"))
    )
    identity, gateway_id = _gateway_signer(fleet)
    args = DeployArgs(deployment_id="dep-forged", release=made["digest"], force=True)
    signers = {
        "forged": (keys.generate_private_key(), None),
        "expired": (identity.private_key, 0.0),
    }
    with MqttProbe(fleet.gateway.broker_endpoint(), "e2e-forgeries") as probe:
        assert not probe.connect().is_failure
        assert not probe.subscribe("$share/e2e/fleet/+/reply").is_failure
        for key, now in signers.values():
            _, token = sign_command(
                key,
                gateway_id=gateway_id,
                device_id=machine.device_id,
                kind=CommandKind.deploy,
                args=args.model_dump(),
                lifetime=300,
                now=now,
            )
            assert not probe.publish(f"fleet/{machine.device_id}/cmd", token).is_failure
        refusals = wait_until(
            lambda: (
                r
                if len(
                    r := [x for x in _replies(probe, machine.device_id) if x["state"] == "refused"]
                )
                == 2
                else None
            ),
            "two refusals",
            machine,
        )
    assert sorted(r["detail"].split(":")[0] for r in refusals) == ["bad_signature", "expired"]
    assert get_flows(machine.node_red) == (rev_before, flows_before)
    assert machine.deploys_seen() == deploys
    assert machine.deploy_commands_received() == received  # never admitted, never run


def test_a_viewer_cannot_push(fleet: Fleet) -> None:
    viewer = fleet.gateway.create_api_token("viewer", "e2e-viewer")
    path = fleet.write_flows("viewer", flows_for("viewer"))
    before = fleet.gateway.cli_json("deployments", "list")
    refused = fleet.gateway.cli("flows", "push", path, "--to", "all", token=viewer, check=False)
    assert refused.returncode == 1
    assert "403" in refused.stderr and "role operator or admin" in refused.stderr
    listed = fleet.gateway.cli("deployments", "list", "--json", token=viewer)
    assert json.loads(listed.stdout) == before


def test_a_bad_flows_file_is_refused_with_the_reason(fleet: Fleet) -> None:
    releases_before = fleet.gateway.cli_json("flows", "list")
    bad = fleet.write_flows("bad", '[{"id": "t1", "type": "tab"}, {"type": "inject", "z": "t1"}]')
    done = fleet.gateway.cli("flows", "push", bad, "--to", "all", check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert "item 1 (type 'inject') has no 'id' string" in done.stderr
    not_json = fleet.write_flows("not-json", "this is not json")
    done = fleet.gateway.cli("flows", "release", not_json, check=False)
    assert done.returncode == 1 and "not valid JSON" in done.stderr
    missing = fleet.gateway.cli("flows", "release", fleet.tmp / "nope.json", check=False)
    assert missing.returncode == 1 and "no flows file" in missing.stderr
    assert fleet.gateway.cli_json("flows", "list") == releases_before
