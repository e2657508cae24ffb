"""Several real `edgefleet gateway run` replicas on one PostgreSQL and one broker.

The broker is a Mosquitto with dynamic security started by the test (standing in for the
clustered broker: EMQX cannot run here); every replica connects to it with `--mqtt-url` as the
gateway identity, shares the signing key, and keeps its own data directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from gateway.broker.mosquitto import MosquittoSupervisor
from provisioning import keys
from tests.support.gateway_process import GatewayProcess
from tests.support.waiting import wait_for


class Cluster:
    def __init__(self, replicas: list[GatewayProcess], broker: MosquittoSupervisor) -> None:
        self.replicas = replicas
        self.broker = broker

    def leader(self) -> GatewayProcess | None:
        """The replica whose /healthz says it runs the singleton jobs (None if none does yet)."""
        leaders = [r for r in self.replicas if r.running and _healthz(r).get("leader")]
        assert len(leaders) <= 1, f"two leaders: {[r.url for r in leaders]}"
        return leaders[0] if leaders else None

    def wait_for_leader(self, timeout: float = 15.0) -> GatewayProcess:
        return wait_for(self.leader, timeout=timeout, what="one replica to lead")


def _healthz(replica: GatewayProcess) -> dict[str, object]:
    try:
        data: dict[str, object] = httpx.get(replica.url + "/healthz", timeout=2).json()
        return data
    except httpx.HTTPError:
        return {}


def replica_args(tmp_path: Path, db_url: str, broker: MosquittoSupervisor) -> list[str]:
    """What every replica of one cluster is started with: the database, the broker (as the
    gateway identity) and one signing key (made in `tmp_path` the first time)."""
    endpoint = broker.endpoint
    assert endpoint.username and endpoint.password and endpoint.ca_file
    signing_key = tmp_path / "signing-key.pem"
    keys.ensure_private_key(signing_key)
    mqtt_url = f"mqtts://{endpoint.username}:{endpoint.password}@{endpoint.host}:{endpoint.port}"
    return [
        "--db",
        db_url,
        "--mqtt-url",
        mqtt_url,
        "--mqtt-ca-file",
        str(endpoint.ca_file),
        "--signing-key",
        str(signing_key),
    ]


@contextmanager
def gateway_cluster(
    tmp_path: Path, db_url: str, broker: MosquittoSupervisor, size: int = 3
) -> Iterator[Cluster]:
    shared = replica_args(tmp_path, db_url, broker)
    with ExitStack() as stack:
        replicas = []
        for n in range(size):
            replica = GatewayProcess(tmp_path / f"replica-{n}", extra_args=shared)
            stack.enter_context(replica)
            replicas.append(replica)
        yield Cluster(replicas, broker)
