"""The agent's local HTTP intake: real requests to the real server on a free port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from edge_agent.telemetry.host_metrics import CPU, DISK, MEMORY, HostSampler
from edge_agent.telemetry.intake import DEFAULT_INTAKE_PORT, IntakeError, IntakeServer
from edge_agent.telemetry.outbox import Outbox
from provisioning.telemetry import Sample
from tests.support.waiting import free_port, port_open, wait_for


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "telemetry.db") as box:
        yield box


@pytest.fixture
def intake(outbox: Outbox) -> Iterator[IntakeServer]:
    server = IntakeServer(outbox, port=free_port(), max_body=4096)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def http(intake: IntakeServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{intake.port}", timeout=5) as client:
        yield client


def stored(outbox: Outbox) -> list[Sample]:
    samples: list[Sample] = []
    cursor = 0
    while (batch := outbox.next_batch(after=cursor)) is not None:
        samples.extend(batch.samples)
        cursor = batch.seq
    return samples


def test_default_port_is_next_to_node_red() -> None:
    assert DEFAULT_INTAKE_PORT == 1881


def test_flat_object_becomes_samples_stamped_now(
    http: httpx.Client, outbox: Outbox, intake: IntakeServer
) -> None:
    before = time.time()
    response = http.post("/telemetry", json={"temp": 21.5, "rpm": 1200})
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 2, "queued": 2}
    samples = stored(outbox)
    assert [(s.metric, s.value) for s in samples] == [("temp", 21.5), ("rpm", 1200.0)]
    assert all(before <= s.ts <= time.time() for s in samples)
    assert intake.url == f"http://127.0.0.1:{intake.port}/telemetry"


def test_explicit_samples_with_and_without_timestamps(http: httpx.Client, outbox: Outbox) -> None:
    then = time.time() - 3600
    body = {"samples": [{"m": "temp", "v": 20, "t": then}, {"m": "line1/rpm", "v": 7.5}]}
    response = http.post("/telemetry", json=body)
    assert response.status_code == 200, response.text
    first, second = stored(outbox)
    assert first == Sample("temp", then, 20.0)
    assert second.metric == "line1/rpm" and second.value == 7.5
    assert abs(second.ts - time.time()) < 5


def test_bare_number_to_a_metric_path(http: httpx.Client, outbox: Outbox) -> None:
    assert http.post("/telemetry/temp", content=b"21.5").status_code == 200
    assert http.post("/telemetry/line1%2Fpressure", content=b"3").status_code == 200
    assert [(s.metric, s.value) for s in stored(outbox)] == [
        ("temp", 21.5),
        ("line1/pressure", 3.0),
    ]


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        ("/telemetry", b"{not json", "malformed_json"),
        ("/telemetry", b"\xff\xfe", "malformed_json"),
        ("/telemetry", b"[" * 2000 + b"]" * 2000, "malformed_json"),  # dropped the connection
        ("/telemetry", b'{"temp": NaN}', "non_numeric"),
        ("/telemetry", b'{"temp": Infinity}', "non_numeric"),
        ("/telemetry", b'{"temp": "21.5"}', "non_numeric"),
        ("/telemetry", b'{"temp": true}', "non_numeric"),
        ("/telemetry", b'{"temp": null}', "non_numeric"),
        ("/telemetry", b'{"ok": 1, "temp": {"value": 1}}', "non_numeric"),
        ("/telemetry", b'{"bad name": 1}', "schema"),
        ("/telemetry", b"[1, 2]", "schema"),
        ("/telemetry", b"{}", "schema"),
        ("/telemetry", b'{"samples": []}', "schema"),
        ("/telemetry", b'{"samples": [{"m": "temp"}]}', "schema"),
        ("/telemetry", b'{"samples": [{"m": "t", "v": 1, "unit": "C"}]}', "schema"),
        ("/telemetry", b'{"samples": [{"m": "t", "v": 1}], "temp": 2}', "schema"),
        ("/telemetry", b'{"samples": [{"m": "t", "v": 1, "t": "now"}]}', "schema"),
        (
            "/telemetry",
            b'{"samples": [{"m": "t", "v": 1, "t": 1732370000123}]}',
            "future_timestamp",
        ),
        ("/telemetry/temp", b'"hot"', "non_numeric"),
        ("/telemetry/bad%20name", b"1", "schema"),
    ],
)
def test_bad_input_is_a_clear_400_and_stores_nothing(
    http: httpx.Client, outbox: Outbox, path: str, body: bytes, reason: str
) -> None:
    http.post("/telemetry", json={"kept": 1})
    response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["error"] == reason
    assert isinstance(error["detail"], str) and error["detail"]
    assert [s.metric for s in stored(outbox)] == ["kept"]


def test_milliseconds_are_explained(http: httpx.Client) -> None:
    ms = int(time.time() * 1000)
    response = http.post("/telemetry", json={"samples": [{"m": "temp", "v": 1, "t": ms}]})
    assert response.status_code == 400
    assert "milliseconds" in response.json()["detail"]


def test_oversized_body_is_refused_and_the_server_stays_up(
    http: httpx.Client, outbox: Outbox
) -> None:
    big = {f"metric_{i}": float(i) for i in range(500)}  # well over the 4096-byte limit
    response = http.post("/telemetry", json=big)
    assert response.status_code == 413
    assert response.json()["error"] == "request_entity_too_large"
    assert "4096" in response.json()["detail"]
    assert len(outbox) == 0
    assert http.post("/telemetry", json={"temp": 1}).status_code == 200


def test_missing_length_is_refused(intake: IntakeServer) -> None:
    with socket.create_connection(("127.0.0.1", intake.port), timeout=5) as sock:
        sock.sendall(b"POST /telemetry HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 411")
    with socket.create_connection(("127.0.0.1", intake.port), timeout=5) as sock:
        sock.sendall(b"POST /telemetry HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 411")
    assert b"Content-Length" in answer


def test_other_methods_and_paths(http: httpx.Client, outbox: Outbox) -> None:
    wrong_method = http.get("/telemetry")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Allow"] == "POST"
    assert http.post("/elsewhere", json={"temp": 1}).status_code == 404
    assert http.get("/elsewhere").status_code == 404
    http.post("/telemetry", json={"temp": 1})
    health = http.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "queued": 1, "dropped": 0}


def test_outbox_failure_is_503(http: httpx.Client, outbox: Outbox) -> None:
    outbox.close()
    response = http.post("/telemetry", json={"temp": 1})
    assert response.status_code == 503
    assert response.json()["error"] == "outbox_unavailable"


def test_concurrent_posts_all_land(
    http: httpx.Client, outbox: Outbox, intake: IntakeServer
) -> None:
    statuses: list[int] = []

    def post(worker: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{intake.port}", timeout=10) as client:
            for i in range(50):
                reply = client.post("/telemetry", json={f"w{worker}": float(i)})
                statuses.append(reply.status_code)

    threads = [threading.Thread(target=post, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 400
    samples = stored(outbox)
    assert len(samples) == 400
    for worker in range(8):  # each client's samples arrive in the order it sent them
        assert [s.value for s in samples if s.metric == f"w{worker}"] == [
            float(i) for i in range(50)
        ]


def test_binds_loopback_only_by_default(outbox: Outbox) -> None:
    server = IntakeServer(outbox, port=0)
    server.start()
    try:
        assert server.port != 0 and port_open(server.port)
        assert server.host == "127.0.0.1"
        other = _non_loopback_address()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, server.port), timeout=1).close()
    finally:
        server.stop()
    assert not port_open(server.port)


def test_port_in_use_is_a_clear_error(outbox: Outbox, intake: IntakeServer) -> None:
    second = IntakeServer(outbox, port=intake.port)
    with pytest.raises(IntakeError, match="another agent"):
        second.start()


def _non_loopback_address() -> str | None:
    """An address of this host that is not loopback, if it has one (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_host_sampler_records_cpu_memory_and_disk(outbox: Outbox, tmp_path: Path) -> None:
    sampler = HostSampler(outbox, interval=0.05, disk_path=tmp_path)
    sampler.start()
    try:
        wait_for(lambda: len(outbox) >= 6, timeout=10, what="two rounds of host metrics")
    finally:
        sampler.stop()
    samples = stored(outbox)
    assert {s.metric for s in samples} == {CPU, MEMORY, DISK}
    assert all(0.0 <= s.value <= 100.0 for s in samples)
    disk = [s.value for s in samples if s.metric == DISK]
    assert abs(disk[-1] - psutil.disk_usage(str(tmp_path)).percent) < 5
    memory = [s.value for s in samples if s.metric == MEMORY]
    assert abs(memory[-1] - psutil.virtual_memory().percent) < 20


def test_host_sampler_without_its_disk_still_reports_cpu_and_memory(
    outbox: Outbox, tmp_path: Path
) -> None:
    sampler = HostSampler(outbox, interval=1, disk_path=tmp_path / "not-mounted")
    assert set(sampler.record()) == {CPU, MEMORY}
    assert {s.metric for s in stored(outbox)} == {CPU, MEMORY}
    with pytest.raises(ValueError, match="interval"):
        HostSampler(outbox, interval=0)
