"""The cluster path: three real gateway processes on one PostgreSQL and one broker."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.broker.mosquitto import MosquittoSupervisor
from provisioning import keys
from tests.support.cluster import Cluster, gateway_cluster

pytestmark = pytest.mark.postgres


@pytest.fixture
def cluster(tmp_path: Path, pg_database: str, broker: MosquittoSupervisor) -> Iterator[Cluster]:
    with gateway_cluster(tmp_path, pg_database, broker) as running:
        yield running


def test_a_write_through_one_replica_is_seen_by_the_others_at_once(cluster: Cluster) -> None:
    a, b, c = cluster.replicas
    admin = {"Authorization": f"Bearer {a.admin_token}"}
    # A token made by `admin create-token` against replica a's database works on every replica.
    for replica in (a, b, c):
        assert httpx.get(replica.url + "/api/v1/devices", headers=admin).status_code == 200
    token = httpx.post(
        a.url + "/api/v1/provisioning-tokens", json={"uses": 1}, headers=admin
    ).json()
    key = keys.generate_private_key()
    enrolled = httpx.post(
        b.url + "/api/v1/enroll",
        json={"token": token["token"], "public_key": keys.public_key_pem(key.public_key())},
    )
    assert enrolled.status_code == 201, enrolled.text
    device_id = enrolled.json()["device_id"]
    # Same gateway identity on every replica: one signing key, one audience.
    assert len({httpx.get(r.url + "/healthz").json()["gateway_id"] for r in (a, b, c)}) == 1
    shown = httpx.get(f"{c.url}/api/v1/devices/{device_id}", headers=admin)
    assert shown.status_code == 200 and shown.json()["tags"] == {}
    used = httpx.get(c.url + "/api/v1/provisioning-tokens", headers=admin).json()
    assert [t["uses"] for t in used if t["id"] == token["id"]] == [1]
    revoked = httpx.post(f"{c.url}/api/v1/devices/{device_id}/revoke", headers=admin)
    assert revoked.status_code == 200
    assert httpx.get(f"{a.url}/api/v1/devices/{device_id}", headers=admin).json()["state"] == (
        "revoked"
    )


def test_one_leader_and_a_new_one_within_seconds_when_it_is_killed(cluster: Cluster) -> None:
    leader = cluster.wait_for_leader()
    assert leader.proc is not None
    os.kill(leader.proc.pid, signal.SIGKILL)
    leader.proc.wait(timeout=10)
    successor = cluster.wait_for_leader(timeout=10)
    assert successor is not leader
    followers = [r for r in cluster.replicas if r.running and r is not successor]
    assert followers and all(f is not cluster.leader() for f in followers)
