"""The support tunnel API on SQLite and PostgreSQL: roles, validation, the address pool, the
device's answers, the bounded wait, the reaper, closing, and the audit trail.

A real broker carries the signed commands; the device's replies are stored through the same
`apply_reply` path the gateway's reply listener uses. The hub replica is stood in for by its
database row (the netns end-to-end tests run the real hub).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from gateway.broker.mosquitto import MosquittoSupervisor
from gateway.commands.models import CommandRecord
from gateway.commands.publisher import CommandPublisher
from gateway.commands.replies import apply_reply
from gateway.db import utcnow
from gateway.errors import TunnelSetupError
from gateway.registry.models import AuditEvent, Role
from gateway.runtime import GatewayRuntime
from gateway.settings import GatewaySettings
from gateway.tunnels import reaper
from gateway.tunnels.hooks import TunnelReplyHooks
from gateway.tunnels.models import HubRecord, TunnelAddress, TunnelRecord
from gateway.tunnels.service import HUB_ID, HUB_STALE_AFTER
from gateway.tunnels.states import TunnelFailure
from gateway.tunnels.wiring import install as install_tunnels
from provisioning import keys
from provisioning.states import TunnelState
from provisioning.wire import Reply
from provisioning.wireguard.keys import generate_keypair
from tests.conftest import api_token
from tests.support.waiting import wait_for

POOL = "10.77.0.0/29"  # hosts .1-.6; .1 is the hub: five addresses, two tunnels
OPEN_TIMEOUT = 1.5
MAX_TTL = 7200


@pytest.fixture
def settings(tmp_path: Any, db_url: str) -> GatewaySettings:
    return GatewaySettings(
        data_dir=tmp_path / "gateway",
        db_url=db_url,
        tunnel_network=POOL,
        tunnel_open_timeout=OPEN_TIMEOUT,
        tunnel_max_ttl=MAX_TTL,
        tunnel_quarantine=600,
    )


@pytest.fixture
def wired(runtime: GatewayRuntime, broker: MosquittoSupervisor) -> Iterator[GatewayRuntime]:
    """The runtime with a real command publisher, the tunnel reply hooks and a live hub row."""
    publisher = CommandPublisher(broker.endpoint, runtime.topics)
    publisher.start()
    runtime.publisher = publisher
    TunnelReplyHooks().register(runtime.hooks)
    set_hub(runtime, heartbeat_age=0)
    yield runtime
    publisher.stop()


def set_hub(runtime: GatewayRuntime, heartbeat_age: float) -> HubRecord:
    now = utcnow()
    with Session(runtime.engine, expire_on_commit=False) as session:
        hub = session.get(HubRecord, HUB_ID) or HubRecord(
            id=HUB_ID,
            public_key=generate_keypair().public_key,
            endpoint="hub.example.com:51820",
            network=POOL,
            hub_ip="10.77.0.1",
            mtu=1280,
            interface="efhub0",
            started_at=now,
            heartbeat_at=now,
        )
        hub.heartbeat_at = now - timedelta(seconds=heartbeat_age)
        session.add(hub)
        session.commit()
        return hub


def headers(runtime: GatewayRuntime, role: Role) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_token(runtime, role)}"}


def enroll_devices(client: TestClient, admin: dict[str, str], count: int) -> list[str]:
    made = client.post("/api/v1/provisioning-tokens", json={"uses": count}, headers=admin)
    token = made.json()["token"]
    ids = []
    for index in range(count):
        key = keys.generate_private_key()
        response = client.post(
            "/api/v1/enroll",
            json={
                "token": token,
                "public_key": keys.public_key_pem(key.public_key()),
                "name": f"m{index}",
            },
        )
        assert response.status_code == 201, response.text
        ids.append(response.json()["device_id"])
    return ids


def open_body(device: str, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "device_id": device,
        "ports": [1880, 22],
        "ttl_seconds": 1800,
        "reason": "ticket 4711",
        "engineer_public_key": generate_keypair().public_key,
        "wait": False,
    }
    body.update(over)
    return body


def row(runtime: GatewayRuntime, tunnel_id: str) -> TunnelRecord:
    with Session(runtime.engine, expire_on_commit=False) as session:
        found = session.get(TunnelRecord, tunnel_id)
        assert found is not None
        return found


def commands_for(runtime: GatewayRuntime, tunnel_id: str, kind: str) -> list[CommandRecord]:
    with Session(runtime.engine, expire_on_commit=False) as session:
        query = select(CommandRecord).where(
            CommandRecord.ref == tunnel_id, CommandRecord.kind == kind
        )
        return list(session.exec(query))


def audits(runtime: GatewayRuntime, action: str) -> list[AuditEvent]:
    with Session(runtime.engine, expire_on_commit=False) as session:
        query = select(AuditEvent).where(AuditEvent.action == action)
        return list(session.exec(query.order_by(col(AuditEvent.id))))


def reply(runtime: GatewayRuntime, device_id: str, command_id: str, **fields: Any) -> None:
    with Session(runtime.engine, expire_on_commit=False) as session:
        apply_reply(session, device_id, Reply(command_id=command_id, **fields), runtime.hooks)


def addresses_in_use(runtime: GatewayRuntime) -> set[str]:
    with Session(runtime.engine) as session:
        rows = session.exec(select(TunnelAddress).where(col(TunnelAddress.released_at).is_(None)))
        return {r.address for r in rows}


# ------------------------------------------------------------------------------------ opening


def test_operator_opens_viewer_only_looks_and_the_device_gets_a_signed_open(
    client: TestClient, admin_headers: dict[str, str], wired: GatewayRuntime
) -> None:
    (device,) = enroll_devices(client, admin_headers, 1)
    viewer, operator = headers(wired, Role.viewer), headers(wired, Role.operator)
    body = open_body(device)

    refused = client.post("/api/v1/tunnels", json=body, headers=viewer)
    assert refused.status_code == 403 and "role support or operator" in refused.json()["detail"]
    assert client.get("/api/v1/tunnels", headers=viewer).json() == []

    made = client.post("/api/v1/tunnels", json=body, headers=operator)
    assert made.status_code == 201, made.text
    tunnel = made.json()
    assert tunnel["state"] == "requested" and tunnel["ports"] == [22, 1880]
    assert tunnel["engineer_public_key"] == body["engineer_public_key"]
    device_ip, engineer_ip = IPv4Address(tunnel["device_ip"]), IPv4Address(tunnel["engineer_ip"])
    pool = IPv4Network(POOL)
    assert device_ip in pool and engineer_ip in pool and device_ip != engineer_ip
    assert IPv4Address("10.77.0.1") not in (device_ip, engineer_ip)  # the hub's own
    assert tunnel["hub_endpoint"] == "hub.example.com:51820" and tunnel["mtu"] == 1280
    assert addresses_in_use(wired) == {str(device_ip), str(engineer_ip)}

    # The device is sent a signed tunnel.open carrying exactly the session it must bring up.
    (sent,) = commands_for(wired, tunnel["id"], "tunnel.open")
    assert sent.state == "sent" and sent.device_id == device
    assert sent.args["tunnel_id"] == tunnel["id"]
    assert sent.args["device_ip"] == str(device_ip)
    assert sent.args["engineer_ip"] == str(engineer_ip)
    assert sent.args["ports"] == [22, 1880] and sent.args["keepalive"] == 15
    assert sent.args["hub_public_key"] == tunnel["hub_public_key"]
    # It expires with the open timeout, so a device that comes back later refuses it.
    lifetime = (sent.expires_at - sent.created_at).total_seconds()
    assert 0 < lifetime <= OPEN_TIMEOUT + 1

    listed = client.get("/api/v1/tunnels", headers=viewer).json()
    assert [t["id"] for t in listed] == [tunnel["id"]]
    shown = client.get(f"/api/v1/tunnels/{tunnel['id']}", headers=viewer).json()
    assert shown["reason"] == "ticket 4711" and shown["actor"].startswith("operator-")
    (opened,) = audits(wired, "tunnel.open")
    assert opened.target == device and opened.actor.startswith("operator-")
    assert opened.detail["why"] == "ticket 4711" and opened.detail["ports"] == [22, 1880]

    # One live tunnel per device.
    again = client.post("/api/v1/tunnels", json=open_body(device), headers=operator)
    assert again.status_code == 409 and again.json()["reason"] == "tunnel_exists"
    assert tunnel["id"] in again.json()["detail"]


@pytest.mark.parametrize(
    ("change", "status", "says"),
    [
        ({"ports": []}, 422, "ports"),
        ({"ports": [0]}, 422, "greater than or equal to 1"),
        ({"ports": [70000]}, 422, "less than or equal to 65535"),
        ({"ttl_seconds": 0}, 422, "greater than 0"),
        ({"ttl_seconds": MAX_TTL + 1}, 422, "at most 2h on this gateway"),
        ({"engineer_public_key": "not a key"}, 422, "engineer public key is not valid base64"),
        ({"engineer_public_key": "YWJj"}, 422, "decodes to 3 bytes"),
        ({"device_id": "dev-unknown"}, 404, "dev-unknown"),
        ({"device_id": "Not An Id"}, 422, "device_id"),
        ({"surprise": 1}, 422, "surprise"),
    ],
)
def test_bad_open_requests_say_what_is_wrong_and_allocate_nothing(
    change: dict[str, Any],
    status: int,
    says: str,
    client: TestClient,
    admin_headers: dict[str, str],
    wired: GatewayRuntime,
) -> None:
    (device,) = enroll_devices(client, admin_headers, 1)
    response = client.post(
        "/api/v1/tunnels", json=open_body(device, **change), headers=admin_headers
    )
    assert response.status_code == status, response.text
    assert says in response.text
    assert addresses_in_use(wired) == set()
    with Session(wired.engine) as session:
        assert session.exec(select(TunnelRecord)).all() == []


def test_without_a_running_hub_the_open_says_so(
    client: TestClient, admin_headers: dict[str, str], wired: GatewayRuntime
) -> None:
    (device,) = enroll_devices(client, admin_headers, 1)
    set_hub(wired, heartbeat_age=HUB_STALE_AFTER + 60)
    stale = client.post("/api/v1/tunnels", json=open_body(device), headers=admin_headers)
    assert stale.status_code == 503 and stale.json()["reason"] == "tunnel_hub_down"
    assert "--tunnel-hub" in stale.json()["detail"]
    with Session(wired.engine) as session:
        session.execute(sa.delete(HubRecord))
        session.commit()
    missing = client.post("/api/v1/tunnels", json=open_body(device), headers=admin_headers)
    assert missing.status_code == 503 and missing.json()["reason"] == "no_tunnel_hub"
    assert addresses_in_use(wired) == set()


def test_pool_exhaustion_quarantine_and_reuse(
    client: TestClient, admin_headers: dict[str, str], wired: GatewayRuntime
) -> None:
    devices = enroll_devices(client, admin_headers, 3)
    first = client.post("/api/v1/tunnels", json=open_body(devices[0]), headers=admin_headers)
    second = client.post("/api/v1/tunnels", json=open_body(devices[1]), headers=admin_headers)
    assert first.status_code == second.status_code == 201
    given = {first.json()["device_ip"], first.json()["engineer_ip"]}
    given |= {second.json()["device_ip"], second.json()["engineer_ip"]}
    assert len(given) == 4  # one /32 each, never shared

    full = client.post("/api/v1/tunnels", json=open_body(devices[2]), headers=admin_headers)
    assert full.status_code == 409 and full.json()["reason"] == "pool_exhausted"
    assert full.json()["detail"] == (
        "tunnel address pool exhausted: a tunnel needs 2 addresses and only 1 of the 5 in "
        "10.77.0.0/29 is free (4 in use, 0 in quarantine after release). Close tunnels that "
        "are no longer needed or configure a larger pool."
    )

    # Closing gives the addresses back, but not at once: they sit in quarantine.
    closed = client.post(
        f"/api/v1/tunnels/{first.json()['id']}/close", json={}, headers=admin_headers
    )
    assert closed.json()["state"] == "closed"
    pool = client.get("/api/v1/tunnels/pool", headers=admin_headers).json()
    assert (pool["size"], pool["in_use"], pool["quarantined"], pool["free"]) == (5, 2, 2, 1)
    assert pool["hub"]["endpoint"] == "hub.example.com:51820"
    still = client.post("/api/v1/tunnels", json=open_body(devices[2]), headers=admin_headers)
    assert still.status_code == 409
    quarantined = r"\(2 in use, 2 in quarantine after release; the next comes back in (59\d|600)s\)"
    assert re.search(quarantined, still.text), still.text

    # Once the quarantine is over (moved into the past here), they are handed out again.
    with Session(wired.engine) as session:
        session.execute(
            sa.update(TunnelAddress)
            .where(col(TunnelAddress.released_at).is_not(None))
            .values(released_at=utcnow() - timedelta(seconds=601))
        )
        session.commit()
    reused = client.post("/api/v1/tunnels", json=open_body(devices[2]), headers=admin_headers)
    assert reused.status_code == 201, reused.text
    again = {reused.json()["device_ip"], reused.json()["engineer_ip"]}
    assert len(again) == 2
    assert again <= {first.json()["device_ip"], first.json()["engineer_ip"], "10.77.0.6"}


def test_concurrent_opens_never_share_an_address(
    client: TestClient, admin_headers: dict[str, str], wired: GatewayRuntime
) -> None:
    devices = enroll_devices(client, admin_headers, 2)
    results: list[Any] = []
    start = threading.Barrier(2)

    def open_one(device: str) -> None:
        start.wait()
        body = open_body(device)
        results.append(client.post("/api/v1/tunnels", json=body, headers=admin_headers))

    threads = [threading.Thread(target=open_one, args=(d,)) for d in devices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in results] == [201, 201], [r.text for r in results]
    taken = [ip for r in results for ip in (r.json()["device_ip"], r.json()["engineer_ip"])]
    assert len(set(taken)) == 4


# ------------------------------------------------------------------------- the device's answers


def test_device_answers_move_the_tunnel_once(
    client: TestClient, admin_headers: dict[str, str], wired: GatewayRuntime
) -> None:
    good, refusing, broken = enroll_devices(client, admin_headers, 3)
    with Session(wired.engine) as session:
        hub = session.get(HubRecord, HUB_ID)
        assert hub is not None
        hub.network = "10.77.0.0/28"  # room for three tunnels
        session.add(hub)
        session.commit()
    opened = {
        d: client.post("/api/v1/tunnels", json=open_body(d), headers=admin_headers).json()
        for d in (good, refusing, broken)
    }
    cmd = {d: commands_for(wired, opened[d]["id"], "tunnel.open")[0].id for d in opened}

    # The device prepared its side: its fresh public key is stored, the hub may add it.
    device_key = generate_keypair().public_key
    data = {"state": "succeeded", "public_key": device_key, "tunnel_id": opened[good]["id"]}
    reply(wired, good, cmd[good], state="succeeded", detail="prepared", data=data)
    prepared = row(wired, opened[good]["id"])
    assert prepared.state == TunnelState.prepared and prepared.device_public_key == device_key
    # The same answer again (a replayed command is answered with its old result): no change.
    reply(wired, good, cmd[good], state="succeeded", detail="prepared", data=data)
    assert row(wired, opened[good]["id"]).state == TunnelState.prepared
    # Another device cannot answer for it (the topic names the sender).
    reply(wired, refusing, cmd[good], state="refused", detail="forged")
    assert row(wired, opened[good]["id"]).state == TunnelState.prepared

    # The owner's policy refuses: the tunnel fails with the device's reason, addresses freed.
    why = "ports [22] are not allowed for support tunnels on this machine; the owner allows [1880]"
    reply(wired, refusing, cmd[refusing], state="refused", detail=why)
    failed = row(wired, opened[refusing]["id"])
    assert failed.state == TunnelState.failed and failed.failure == TunnelFailure.device_refused
    assert failed.close_reason == f"the device refused: {why}"
    assert not failed.device_close_due  # it brought nothing up
    assert opened[refusing]["device_ip"] not in addresses_in_use(wired)
    (fail_audit,) = audits(wired, "tunnel.fail")
    assert fail_audit.target == refusing and why in fail_audit.detail["why"]

    # An answer without a usable key is a failure too, and the device is told to drop its side.
    reply(wired, broken, cmd[broken], state="succeeded", data={"public_key": "junk"})
    bad = row(wired, opened[broken]["id"])
    assert bad.state == TunnelState.failed and bad.failure == TunnelFailure.device_failed
    assert bad.device_close_due


@pytest.mark.parametrize(
    ("asked", "bound", "shown"),
    [(1.0, 1.0, "1s"), (100.0, OPEN_TIMEOUT, "2s")],  # shorter; capped at the gateway's
)
def test_open_waits_a_bounded_time_for_an_offline_device_then_leaves_nothing(
    asked: float,
    bound: float,
    shown: str,
    client: TestClient,
    admin_headers: dict[str, str],
    wired: GatewayRuntime,
) -> None:
    (device,) = enroll_devices(client, admin_headers, 1)
    started = time.monotonic()
    response = client.post(
        "/api/v1/tunnels",
        json=open_body(device, wait=True, open_timeout=asked),
        headers=admin_headers,
    )
    waited = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert bound - 0.1 <= waited < bound + 3
    detail = response.json()["detail"]
    assert f"device {device} did not answer within {shown}" in detail
    assert "offline or its agent is not running" in detail and "Nothing was left open" in detail
    (tunnel,) = client.get(
        "/api/v1/tunnels", params={"include_closed": True}, headers=admin_headers
    ).json()
    assert tunnel["state"] == "failed" and tunnel["failure"] == "device_offline"
    assert addresses_in_use(wired) == set()
    # The device may get the queued open later: the reaper tells it to drop that side again.
    reaper.reap(wired)
    (close,) = commands_for(wired, tunnel["id"], "tunnel.close")
    assert close.args == {"tunnel_id": tunnel["id"], "reason": tunnel["close_reason"]}
    reaper.reap(wired)
    assert len(commands_for(wired, tunnel["id"], "tunnel.close")) == 1  # sent once


def test_refusal_during_the_wait_is_answered_with_the_owners_reason(
    client: TestClient, admin_headers: dict[str, str], wired: GatewayRuntime
) -> None:
    (device,) = enroll_devices(client, admin_headers, 1)
    wired.settings.tunnel_open_timeout = 10

    def refuse() -> None:
        def sent() -> list[CommandRecord]:
            with Session(wired.engine) as session:
                query = select(CommandRecord).where(CommandRecord.kind == "tunnel.open")
                return list(session.exec(query))

        (command,) = wait_for(sent, timeout=10, what="the tunnel.open command")
        reply(wired, device, command.id, state="refused", detail="remote support is disabled")

    helper = threading.Thread(target=refuse)
    helper.start()
    started = time.monotonic()
    response = client.post(
        "/api/v1/tunnels", json=open_body(device, wait=True), headers=admin_headers
    )
    helper.join()
    assert time.monotonic() - started < 5  # answered on the refusal, not at the timeout
    assert response.status_code == 409 and response.json()["reason"] == "device_refused"
    assert "the device refused: remote support is disabled" in response.json()["detail"]
    assert addresses_in_use(wired) == set()


# ------------------------------------------------------------------------- expiry and closing


def test_reaper_expires_tunnels_and_hands_on_hub_ones_to_the_hub(
    client: TestClient, admin_headers: dict[str, str], wired: GatewayRuntime
) -> None:
    queued, on_hub = enroll_devices(client, admin_headers, 2)
    a = client.post("/api/v1/tunnels", json=open_body(queued), headers=admin_headers).json()
    b = client.post("/api/v1/tunnels", json=open_body(on_hub), headers=admin_headers).json()
    past = utcnow() - timedelta(seconds=1)
    with Session(wired.engine) as session:
        session.execute(
            sa.update(TunnelRecord)
            .where(col(TunnelRecord.id) == b["id"])
            .values(state=TunnelState.open, hub_added_at=past, opened_at=past)
        )
        lifetime = timedelta(seconds=1800)
        session.execute(sa.update(TunnelRecord).values(created_at=past - lifetime, expires_at=past))
        session.commit()
    reaper.reap(wired)

    # Never on the hub: final at once, addresses back, audited, device told.
    expired = row(wired, a["id"])
    assert expired.state == TunnelState.expired and expired.closed_by == "gateway"
    assert "end of its 30m lifetime" in (expired.close_reason or "")
    (event,) = audits(wired, "tunnel.expire")
    assert event.target == queued and event.detail["opened_by"] == a["actor"]
    assert {"bytes_from_device", "bytes_to_device"} <= set(event.detail)
    assert len(commands_for(wired, a["id"], "tunnel.close")) == 1
    # On the hub: handed to the hub runner, which removes the peers and then finalizes.
    closing = row(wired, b["id"])
    assert closing.state == TunnelState.closing and closing.close_state == TunnelState.expired
    assert b["device_ip"] in addresses_in_use(wired)


def test_close_is_operator_only_idempotent_and_audited(
    client: TestClient, admin_headers: dict[str, str], wired: GatewayRuntime
) -> None:
    (device,) = enroll_devices(client, admin_headers, 1)
    tunnel = client.post("/api/v1/tunnels", json=open_body(device), headers=admin_headers).json()
    viewer = headers(wired, Role.viewer)
    assert client.post(f"/api/v1/tunnels/{tunnel['id']}/close", headers=viewer).status_code == 403
    unknown = client.post("/api/v1/tunnels/t-nothere/close", headers=admin_headers)
    assert unknown.status_code == 404 and "t-nothere" in unknown.json()["detail"]

    closed = client.post(
        f"/api/v1/tunnels/{tunnel['id']}/close",
        json={"reason": "done early"},
        headers=admin_headers,
    ).json()
    assert closed["state"] == "closed" and closed["close_reason"] == "done early"
    assert closed["closed_by"].startswith("admin-")
    again = client.post(f"/api/v1/tunnels/{tunnel['id']}/close", headers=admin_headers).json()
    assert again["closed_at"] == closed["closed_at"]  # nothing changed the second time
    (event,) = audits(wired, "tunnel.close")
    assert event.detail["why"] == "done early" and event.target == device
    assert client.get("/api/v1/tunnels", headers=viewer).json() == []
    everything = client.get(
        "/api/v1/tunnels", params={"include_closed": True}, headers=viewer
    ).json()
    assert [t["state"] for t in everything] == ["closed"]


def test_a_hub_without_an_endpoint_refuses_to_start(
    settings: GatewaySettings, runtime: GatewayRuntime
) -> None:
    runtime.settings = settings.model_copy(update={"tunnel_hub": True})
    with contextlib.ExitStack() as stack, pytest.raises(TunnelSetupError) as failed:
        install_tunnels(runtime, stack)
    assert str(failed.value) == (
        "--tunnel-hub needs --tunnel-endpoint HOST:PORT: the address machines and engineers "
        "dial (UDP) to reach this hub"
    )
    assert runtime.hooks.for_kind("tunnel.open") == []  # nothing was installed
