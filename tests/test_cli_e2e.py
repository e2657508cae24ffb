"""Provision a new machine, end to end, through the `edgefleet` command line only.

A real `edgefleet gateway run` (SQLite, the Mosquitto it supervises, TLS, dynamic security) runs
once for the module; machines enroll with `edgefleet agent enroll` and run `edgefleet agent run`
as subprocesses; operators use `edgefleet token|devices|audit` with EDGEFLEET_GATEWAY and
EDGEFLEET_TOKEN. The start-error tests run their own short-lived gateways.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.support import local_http
from tests.support.gateway_process import (
    AgentProcess,
    GatewayProcess,
    processes_mentioning,
    run_edgefleet,
    wait_until,
)
from tests.support.waiting import free_port

MachineFactory = Callable[[str], AgentProcess]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(tmp_path_factory.mktemp("gateway") / "data")
    gateway.start()
    yield gateway
    # Asserts a clean stop: SIGTERM is enough, and no Mosquitto of the data dir is left.
    gateway.stop()


@pytest.fixture
def machine(gw: GatewayProcess, tmp_path: Path) -> Iterator[MachineFactory]:
    """Make machines (state dirs under this test's tmp_path); stops their agents afterwards."""
    made: list[AgentProcess] = []

    def make(name: str) -> AgentProcess:
        agent = AgentProcess(gw, tmp_path / name, name)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.stop()


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _by_id(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["id"]: item for item in items}


def _token(gw: GatewayProcess, token_id: str) -> dict[str, Any]:
    token: dict[str, Any] = _by_id(gw.cli_json("token", "list"))[token_id]
    return token


def _online(gw: GatewayProcess, device_id: str, since: datetime | None = None) -> bool:
    device = gw.device(device_id, include_revoked=False)
    if device is None or not device["online"] or device["last_seen"] is None:
        return False
    return since is None or _time(device["last_seen"]) >= since


def _offline(gw: GatewayProcess, device_id: str) -> bool:
    device = gw.device(device_id)
    return device is not None and not device["online"]


def _assert_failed(done: Any, *words: str) -> None:
    """A refused command: non-zero exit, nothing on stdout, a message with `words` on stderr."""
    shown = f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode != 0, shown
    assert done.stdout == "", shown
    assert "Traceback" not in done.stderr, shown
    for word in words:
        assert word in done.stderr, f"{word!r} missing from stderr; {shown}"


# ---- enrollment and the registry -----------------------------------------------------------


def test_two_agents_enrolled_with_one_token_are_listed_online(
    gw: GatewayProcess, machine: MachineFactory
) -> None:
    created = gw.create_provisioning_token("--tag", "site=demo", "--tag", "line=a", "--uses", "2")
    tags = {"site": "demo", "line": "a"}
    assert created["tags"] == tags and created["max_uses"] == 2
    agents = [machine("press-01"), machine("press-02")]
    for agent in agents:
        enrolled = json.loads(agent.enroll(created["token"]).stdout)
        assert enrolled["tags"] == tags
        assert enrolled["device_id"] == agent.device_id
        agent.start()
    ids = {agent.device_id for agent in agents}
    assert len(ids) == 2, "two machines must get two device ids"

    def both_online() -> dict[str, dict[str, Any]] | None:
        listed = {d["id"]: d for d in gw.devices() if d["id"] in ids}
        return listed if len(listed) == 2 and all(d["online"] for d in listed.values()) else None

    listed = wait_until(both_online, "both machines online in `devices list`", gw, *agents)
    now = datetime.now(UTC)
    for agent in agents:
        device = listed[agent.device_id]
        assert device["name"] == agent.name
        assert device["tags"] == tags
        assert device["state"] == "active"
        enrolled_at = _time(device["enrolled_at"])
        last_seen = _time(device["last_seen"])
        assert now - timedelta(minutes=2) < enrolled_at <= now
        assert enrolled_at <= last_seen <= now + timedelta(seconds=1)
        assert now - last_seen < timedelta(seconds=60), f"last_seen not recent: {device}"

    table = gw.cli("devices", "list").stdout
    for agent in agents:
        rows = [line for line in table.splitlines() if agent.device_id in line]
        assert len(rows) == 1, table
        assert agent.name in rows[0] and "online" in rows[0], table
        assert "line=a,site=demo" in rows[0], table

    for agent in agents:
        shown = gw.cli_json("devices", "show", agent.device_id)
        assert shown == listed[agent.device_id]

    assert _token(gw, created["id"])["uses"] == 2

    # A clean stop says "offline"; a machine that vanishes gets its Last Will ("offline").
    stopped, vanished = agents
    assert stopped.stop() == 0, stopped.log_tail()
    vanished.kill()
    for agent in agents:
        wait_until(partial(_offline, gw, agent.device_id), f"{agent.name} offline", gw, agent)


def test_exhausted_token_enrolls_nothing(gw: GatewayProcess, machine: MachineFactory) -> None:
    created = gw.create_provisioning_token("--uses", "2", "--tag", "batch=x")
    first, second = machine("press-11"), machine("press-12")
    first.enroll(created["token"])
    second.enroll(created["token"])
    devices_before = sorted(d["id"] for d in gw.devices(include_revoked=True))
    credentials_before = gw.broker_credentials()
    assert {first.device_id, second.device_id} <= set(credentials_before)

    third = machine("press-13")
    done = third.enroll(created["token"], check=False)
    _assert_failed(done, "exhausted")
    assert not third.state_dir.exists() or not any(third.state_dir.iterdir())
    assert sorted(d["id"] for d in gw.devices(include_revoked=True)) == devices_before
    assert gw.broker_credentials() == credentials_before
    token = _token(gw, created["id"])
    assert (token["uses"], token["state"]) == (2, "exhausted")


def test_enroll_again_is_refused_unless_forced(gw: GatewayProcess, machine: MachineFactory) -> None:
    created = gw.create_provisioning_token("--uses", "2")
    agent = machine("press-21")
    agent.enroll(created["token"])
    first_id = agent.device_id
    for path in (agent.key_path, agent.identity_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    identity, key = agent.identity_path.read_bytes(), agent.key_path.read_bytes()

    done = agent.enroll(created["token"], check=False)
    _assert_failed(done, "already enrolled", first_id)
    assert agent.identity_path.read_bytes() == identity
    assert agent.key_path.read_bytes() == key
    assert _token(gw, created["id"])["uses"] == 1, "a refused re-enroll must not use the token"

    forced = json.loads(agent.enroll(created["token"], force=True).stdout)
    assert forced["device_id"] != first_id
    assert agent.device_id == forced["device_id"]
    assert agent.key_path.read_bytes() != key, "--force must make a new key pair"
    for path in (agent.key_path, agent.identity_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert gw.device(forced["device_id"]) is not None


def test_json_output_is_one_document_and_errors_go_to_stderr(
    gw: GatewayProcess, machine: MachineFactory
) -> None:
    def one_document(*args: str, token: str | None = None) -> Any:
        done = gw.cli(*args, "--json", token=token)
        assert done.stderr == "", f"{args}: stderr not empty: {done.stderr}"
        return json.loads(done.stdout)  # fails on anything but exactly one document

    created = one_document("token", "create", "--tag", "site=json")
    assert isinstance(created, dict) and created["token"]
    assert isinstance(one_document("token", "list"), list)
    agent = machine("press-31")
    done = gw.cli(*agent.enroll_args(created["token"]), token="")
    assert done.stderr == ""
    enrolled = json.loads(done.stdout)
    assert enrolled["device_id"] == agent.device_id
    assert isinstance(one_document("devices", "list"), list)
    assert isinstance(one_document("devices", "list", "--all"), list)
    assert one_document("devices", "show", agent.device_id)["id"] == agent.device_id
    assert one_document("devices", "revoke", agent.device_id)["state"] == "revoked"
    spare = one_document("token", "create")
    assert one_document("token", "revoke", spare["id"])["state"] == "revoked"
    assert isinstance(one_document("audit"), list)
    # An admin user exists (the fixture's): the bootstrap token would be spent, so none is made.
    _assert_failed(gw.cli("admin", "create-token", "--json", check=False), "an admin user exists")

    _assert_failed(gw.cli("devices", "show", "dev-nonexistent", "--json", check=False), "404")
    _assert_failed(gw.cli("token", "revoke", "pt-nonexistent", "--json", check=False), "404")
    unreachable = {"EDGEFLEET_GATEWAY": f"http://127.0.0.1:{free_port()}"}
    _assert_failed(
        gw.cli("devices", "list", "--json", env=unreachable, check=False), "cannot reach"
    )


def test_revoked_device_is_disconnected_and_audited(
    gw: GatewayProcess, machine: MachineFactory
) -> None:
    created = gw.create_provisioning_token("--tag", "site=revoke")
    agent = machine("press-41")
    agent.enroll(created["token"])
    device_id = agent.device_id
    agent.start()
    agent.wait_connected()
    wait_until(lambda: _online(gw, device_id), "the machine online", gw, agent)
    offset = len(agent.log_text())

    done = gw.cli("devices", "revoke", device_id)
    assert "revoked" in done.stdout

    def refused_after_revoke() -> bool:
        after = agent.log_text()[offset:]
        return "disconnected from the broker" in after and "Not authorized" in after

    wait_until(refused_after_revoke, "the agent kicked and refused by the broker", gw, agent)
    assert device_id not in {d["id"] for d in gw.devices()}
    revoked = gw.device(device_id, include_revoked=True)
    assert revoked is not None
    assert revoked["state"] == "revoked" and revoked["revoked_at"] and not revoked["online"]
    assert device_id not in gw.broker_credentials()
    table = gw.cli("devices", "list", "--all").stdout
    assert any(device_id in row and "revoked" in row for row in table.splitlines()), table

    events: list[dict[str, Any]] = gw.cli_json("audit", "--limit", "1000")
    admin_actor = f"[{gw.admin_token_id}]"  # the person's email and the token they used

    def event(action: str, target: str) -> dict[str, Any]:
        found = [e for e in events if e["action"] == action and e["target"] == target]
        assert len(found) == 1, f"{action} on {target}: {found}"
        return found[0]

    assert event("device.enroll", device_id)["actor"] == f"token:{created['id']}"
    assert admin_actor in event("device.revoke", device_id)["actor"]
    assert admin_actor in event("provisioning_token.create", created["id"])["actor"]
    made_by = event("api_token.create", gw.admin_token_id)
    assert made_by["actor"] == "tests-admin@tests.example.com" and made_by["user_id"]
    assert all(e["actor"] and e["at"] for e in events)


def test_revoked_expired_and_unknown_tokens_enroll_nothing(
    gw: GatewayProcess, machine: MachineFactory
) -> None:
    devices_before = len(gw.devices(include_revoked=True))
    agent = machine("press-51")

    revoked = gw.create_provisioning_token()
    gw.cli("token", "revoke", revoked["id"])
    assert _token(gw, revoked["id"])["state"] == "revoked"
    _assert_failed(agent.enroll(revoked["token"], check=False), "revoked")

    expiring = gw.create_provisioning_token("--ttl", "1s")
    wait_until(lambda: _token(gw, expiring["id"])["state"] == "expired", "the token to expire", gw)
    _assert_failed(agent.enroll(expiring["token"], check=False), "expired")

    unknown = "efp_" + secrets.token_urlsafe(32)
    _assert_failed(agent.enroll(unknown, check=False), "unknown")

    usable = gw.create_provisioning_token()["token"]
    nowhere = AgentProcess(gw, agent.state_dir, agent.name)
    nowhere.gateway_url = f"http://127.0.0.1:{free_port()}"
    _assert_failed(nowhere.enroll(usable, check=False), "cannot reach the gateway")

    assert not agent.identity_path.exists() and not agent.key_path.exists()
    assert len(gw.devices(include_revoked=True)) == devices_before
    for token_id in (revoked["id"], expiring["id"]):
        assert _token(gw, token_id)["uses"] == 0
    events = gw.cli_json(
        "audit", "--action", "provisioning_token.revoke", "--target", revoked["id"]
    )
    assert len(events) == 1 and f"[{gw.admin_token_id}]" in events[0]["actor"], events


def test_roles_limit_what_a_token_may_do(gw: GatewayProcess, machine: MachineFactory) -> None:
    viewer = gw.create_api_token("viewer")
    operator = gw.create_api_token("operator")
    agent = machine("press-61")
    agent.enroll(gw.create_provisioning_token()["token"])
    device_id = agent.device_id

    listed = json.loads(gw.cli("devices", "list", "--json", token=viewer).stdout)
    assert device_id in {d["id"] for d in listed}
    _assert_failed(gw.cli("token", "create", token=viewer, check=False), "403", "operator")
    _assert_failed(gw.cli("devices", "revoke", device_id, token=viewer, check=False), "403")

    made = json.loads(gw.cli("token", "create", "--json", token=operator).stdout)
    assert made["token"]
    _assert_failed(
        gw.cli("devices", "revoke", device_id, token=operator, check=False), "403", "admin"
    )
    still = gw.device(device_id)
    assert still is not None and still["state"] == "active"
    assert device_id in gw.broker_credentials()

    wrong = "eft_" + secrets.token_urlsafe(32)
    _assert_failed(gw.cli("devices", "list", token=wrong, check=False), "401")
    _assert_failed(gw.cli("devices", "list", token="", check=False), "EDGEFLEET_TOKEN")


def test_killed_broker_is_restarted_and_agents_reconnect(
    gw: GatewayProcess, machine: MachineFactory
) -> None:
    agent = machine("press-71")
    agent.enroll(gw.create_provisioning_token()["token"])
    agent.start()
    agent.wait_connected()
    wait_until(lambda: _online(gw, agent.device_id), "the machine online", gw, agent)
    old_pid = gw.broker_pid()
    connects = agent.connects()
    log_offset = len(gw.log_text())
    killed_at = datetime.now(UTC)

    os.kill(old_pid, signal.SIGKILL)

    def restarted() -> bool:
        after = gw.log_text()[log_offset:]
        return "mosquitto exited" in after and "restarting" in after

    wait_until(restarted, "the gateway to say it restarts the broker", gw)
    wait_until(lambda: gw.broker_pid() != old_pid, "a new broker process", gw)
    assert not Path(f"/proc/{old_pid}/cmdline").exists() or old_pid not in gw.mosquitto_pids()
    agent.wait_connected(connects + 1, timeout=30)
    wait_until(
        lambda: _online(gw, agent.device_id, since=killed_at),
        "the machine online again after the broker restart",
        gw,
        agent,
    )

    late = machine("press-72")
    late.enroll(gw.create_provisioning_token()["token"])
    assert late.device_id in gw.broker_credentials()
    late.start()
    late.wait_connected()
    wait_until(lambda: _online(gw, late.device_id), "the new machine online", gw, late)


def test_gateway_restart_keeps_machines_and_their_pinned_ca(tmp_path: Path) -> None:
    first = GatewayProcess(tmp_path / "restarted")
    with first:
        agent = AgentProcess(first, tmp_path / "press-81", "press-81")
        agent.enroll(first.create_provisioning_token("--tag", "site=restart")["token"])
        ca_pem = (agent.state_dir / "ca.pem").read_bytes()
        agent.start()
        try:
            agent.wait_connected()
            first.stop()
            assert first.proc is not None and first.proc.returncode == 0, first.log_tail()
            again = GatewayProcess(
                first.data_dir, http_port=first.http_port, mqtt_port=first.mqtt_port
            )
            with again:
                # The agent trusts only the CA it pinned at enrollment: a new CA would lock it out.
                agent.wait_connected(2, timeout=40)
                wait_until(lambda: _online(again, agent.device_id), "online again", again, agent)
                device = again.device(agent.device_id)
                assert device is not None and device["tags"] == {"site": "restart"}
                assert agent.device_id in again.broker_credentials()
                old_admin = again.cli("devices", "list", "--json", token=first.admin_token)
                assert agent.device_id in old_admin.stdout, "API tokens must survive a restart"
        finally:
            agent.stop()
    assert (agent.state_dir / "ca.pem").read_bytes() == ca_pem


# ---- gateway start errors ------------------------------------------------------------------


def _gateway_run(data_dir: Path, *args: str) -> tuple[Any, float]:
    started = time.monotonic()
    done = run_edgefleet("gateway", "run", "--data-dir", data_dir, *args, check=False, timeout=60)
    return done, time.monotonic() - started


def _no_broker_left(data_dir: Path) -> None:
    left = processes_mentioning(str(data_dir.resolve() / "mosquitto" / "mosquitto.conf"))
    assert left == [], f"a mosquitto of {data_dir} was left running: {left}"


def test_http_port_in_use_names_the_flag(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done, took = _gateway_run(
            tmp_path / "d", "--http", f"127.0.0.1:{port}", "--mqtt-port", str(free_port())
        )
    _assert_failed(done, "--http", str(port))
    assert took < 20, f"took {took:.1f}s to give up"
    _no_broker_left(tmp_path / "d")


def test_mqtt_port_in_use_names_the_flag(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done, took = _gateway_run(
            tmp_path / "d", "--http", f"127.0.0.1:{free_port()}", "--mqtt-port", str(port)
        )
    _assert_failed(done, "--mqtt-port", str(port))
    assert took < 20, f"took {took:.1f}s to give up"
    _no_broker_left(tmp_path / "d")


def test_second_gateway_on_one_sqlite_data_dir_is_refused(tmp_path: Path) -> None:
    with GatewayProcess(tmp_path / "d") as first:
        broker = first.broker_pid()
        done, took = _gateway_run(
            first.data_dir,
            "--http",
            f"127.0.0.1:{free_port()}",
            "--mqtt-port",
            str(free_port()),
        )
        _assert_failed(done, "one replica")
        assert took < 20, f"took {took:.1f}s to give up"
        assert local_http.get(first.url + "/healthz", timeout=5).status_code == 200
        assert first.broker_pid() == broker, "the refused gateway touched the running broker"
        first.stop()
        assert first.proc is not None and first.proc.returncode == 0, first.log_tail()
    _no_broker_left(tmp_path / "d")


def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    done, took = _gateway_run(
        tmp_path / "d",
        "--http",
        f"127.0.0.1:{free_port()}",
        "--mqtt-port",
        str(free_port()),
        "--db",
        "postgresql://nobody@127.0.0.1:1/x",
    )
    _assert_failed(done, "cannot reach the database")
    assert took < 20, f"took {took:.1f}s to give up"
    _no_broker_left(tmp_path / "d")
    admin = run_edgefleet(
        "admin",
        "create-token",
        "--db",
        "postgresql://nobody@127.0.0.1:1/x",
        check=False,
    )
    _assert_failed(admin, "cannot reach the database")


def test_http_and_mqtt_on_one_port_names_a_flag(tmp_path: Path) -> None:
    port = free_port()
    done, took = _gateway_run(
        tmp_path / "d", "--http", f"127.0.0.1:{port}", "--mqtt-port", str(port)
    )
    assert took < 20, f"took {took:.1f}s to give up"
    _no_broker_left(tmp_path / "d")
    _assert_failed(done, "edgefleet: error:", str(port))
    assert "--http" in done.stderr or "--mqtt-port" in done.stderr, done.stderr


# ---- help ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((), ("gateway", "agent", "token", "devices", "audit", "admin")),
        (("agent",), ("enroll", "run")),
        (("agent", "enroll"), ("--gateway", "--token", "--name", "--state-dir", "--force")),
        (("token", "create"), ("--tag", "--ttl", "--uses", "--json")),
        (("gateway", "run"), ("--data-dir", "--http", "--mqtt-port", "--mqtt-url", "--db")),
    ],
)
def test_help_names_the_key_options(args: tuple[str, ...], words: tuple[str, ...]) -> None:
    done = run_edgefleet(*args, "--help")
    assert done.returncode == 0
    for word in words:
        assert word in done.stdout, f"{word!r} missing from `edgefleet {' '.join(args)} --help`"
