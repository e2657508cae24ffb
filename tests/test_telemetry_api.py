"""Telemetry queries over HTTP and the command line, on known data (SQLite and PostgreSQL).

The API runs in the real app (FastAPI TestClient); the command line runs as a real `edgefleet`
subprocess against the same app served by uvicorn on a loopback port.
"""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any

import pytest
import uvicorn
from fastapi.testclient import TestClient

from edgefleet.cmd_telemetry import parse_when
from edgefleet.output import CommandError
from gateway.app import create_app
from gateway.registry.models import Role
from gateway.runtime import GatewayRuntime
from gateway.telemetry.metrics import TelemetryMetrics
from gateway.telemetry.store import IncomingBatch, TelemetryStore
from provisioning.telemetry import Sample
from tests.conftest import api_token
from tests.support.gateway_process import clean_env, edgefleet_command, run_edgefleet
from tests.support.telemetry import add_device
from tests.support.waiting import free_port, wait_for

T0 = 1_700_000_040.0  # a multiple of 60: 2023-11-14T22:14:00Z
DEVICE = "press-07"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


@pytest.fixture
def known(runtime: GatewayRuntime) -> GatewayRuntime:
    """press-07 measured temp = 0..59 every 10 s from T0, and line1/rpm twice."""
    add_device(runtime.engine, DEVICE)
    add_device(runtime.engine, "quiet-01")
    store = TelemetryStore(runtime.engine)
    temps = [Sample("temp", T0 + 10 * i, float(i)) for i in range(60)]
    store.write(
        [
            IncomingBatch(DEVICE, 1, temps[:30]),
            IncomingBatch(DEVICE, 2, temps[30:]),
            IncomingBatch(DEVICE, 3, [Sample("line1/rpm", T0, 1200.0)]),
            IncomingBatch(DEVICE, 4, [Sample("line1/rpm", T0 + 5, 1250.5)]),
        ],
        received_at=T0 + 600,
    )
    return runtime


@pytest.fixture
def viewer(known: GatewayRuntime) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_token(known, Role.viewer)}"}


def path(rest: str, device: str = DEVICE) -> str:
    return f"/api/v1/devices/{device}/telemetry/{rest}"


def test_latest_value_of_each_metric(client: TestClient, viewer: dict[str, str]) -> None:
    response = client.get(path("latest"), headers=viewer)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["device_id"] == DEVICE
    got = [(m["metric"], m["ts"], m["value"]) for m in body["metrics"]]
    assert got == [("line1/rpm", T0 + 5, 1250.5), ("temp", T0 + 590, 59.0)]
    assert body["metrics"][1]["time"].startswith("2023-11-14T22:23:50")
    quiet = client.get(path("latest", "quiet-01"), headers=viewer).json()
    assert quiet["metrics"] == []


def test_buckets_give_min_max_avg_count(client: TestClient, viewer: dict[str, str]) -> None:
    params: dict[str, Any] = {"since": iso(T0), "until": T0 + 600, "every": 60}
    response = client.get(path("temp"), params=params, headers=viewer)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["since"], body["until"], body["every"]) == (T0, T0 + 600, 60.0)
    buckets = [(b["start"], b["count"], b["min"], b["max"], b["avg"]) for b in body["buckets"]]
    assert buckets == [(T0 + 60 * k, 6, 6.0 * k, 6.0 * k + 5, 6.0 * k + 2.5) for k in range(10)]
    # A range cut mid-bucket: the buckets stay aligned, only samples inside count.
    part = client.get(
        path("temp"), params={"since": T0 + 30, "until": T0 + 90, "every": 60}, headers=viewer
    ).json()["buckets"]
    assert [(b["start"], b["count"], b["min"], b["max"]) for b in part] == [
        (T0, 3, 3.0, 5.0),
        (T0 + 60, 3, 6.0, 8.0),
    ]


def test_metric_names_with_slashes_and_default_width(
    client: TestClient, viewer: dict[str, str]
) -> None:
    params = {"since": T0 - 60, "until": T0 + 60}
    body = client.get(path("line1/rpm"), params=params, headers=viewer).json()
    assert body["every"] == 1.0  # 120 s / about 500 buckets -> the nearest round width
    assert [(b["start"], b["avg"]) for b in body["buckets"]] == [(T0, 1200.0), (T0 + 5, 1250.5)]
    empty = client.get(path("no.such:metric"), params=params, headers=viewer).json()
    assert empty["buckets"] == []


def test_csv_export_streams_every_sample(client: TestClient, viewer: dict[str, str]) -> None:
    params = {"since": T0, "until": T0 + 600}
    response = client.get(path("export.csv"), params=params | {"metric": "temp"}, headers=viewer)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows[0] == ["ts", "time", "metric", "value"]
    assert [(float(r[0]), r[2], float(r[3])) for r in rows[1:]] == [
        (T0 + 10 * i, "temp", float(i)) for i in range(60)
    ]
    assert rows[1][1] == "2023-11-14T22:14:00+00:00"
    everything = client.get(path("export.csv"), params=params, headers=viewer).text
    assert len(everything.strip().splitlines()) == 1 + 2 + 60  # header, rpm, temp


def test_bad_queries_get_clear_errors(
    client: TestClient, viewer: dict[str, str], known: GatewayRuntime
) -> None:
    assert client.get(path("latest")).status_code == 401
    missing = client.get(path("latest", "no-such-device"), headers=viewer)
    assert missing.status_code == 404 and missing.json()["reason"] == "unknown_device"
    backwards = client.get(path("temp"), params={"since": T0, "until": T0 - 1}, headers=viewer)
    assert backwards.status_code == 422 and backwards.json()["reason"] == "bad_range"
    huge = client.get(
        path("temp"), params={"since": 0, "until": T0, "every": 1}, headers=viewer
    ).json()
    assert huge["reason"] == "bad_query" and "every larger" in huge["detail"]
    bad_name = client.get(path("temp$"), headers=viewer)
    assert bad_name.status_code == 422 and bad_name.json()["reason"] == "bad_metric"
    zero = client.get(path("temp"), params={"every": 0}, headers=viewer)
    assert zero.status_code == 422
    not_a_time = client.get(path("temp"), params={"since": "yesterday"}, headers=viewer)
    assert not_a_time.status_code == 422


def test_metrics_endpoint_serves_the_runtime_registry(
    client: TestClient, runtime: GatewayRuntime
) -> None:
    metrics = TelemetryMetrics(runtime.metrics)
    metrics.refused.labels(reason="oversized").inc(3)
    metrics.samples.inc(1234)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'edgefleet_telemetry_refused_total{reason="oversized"} 3.0' in text
    assert 'edgefleet_telemetry_refused_total{reason="schema"} 0.0' in text
    assert "edgefleet_telemetry_samples_stored_total 1234.0" in text
    assert "edgefleet_telemetry_write_seconds_bucket" in text


# ---- the command line ----------------------------------------------------------------------


@pytest.fixture
def served(known: GatewayRuntime) -> Iterator[dict[str, str]]:
    """The app on a loopback port; the environment the CLI needs to reach it as a viewer."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(known), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10, what="uvicorn")
    yield {
        "EDGEFLEET_GATEWAY": f"http://127.0.0.1:{port}",
        "EDGEFLEET_TOKEN": api_token(known, Role.viewer),
    }
    server.should_exit = True
    thread.join(10)


sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@sqlite_only
def test_cli_latest_and_query(served: dict[str, str]) -> None:
    table = run_edgefleet("telemetry", "latest", DEVICE, env=served).stdout
    lines = table.splitlines()
    assert lines[0].split() == ["METRIC", "VALUE", "TIME", "(UTC)", "AGE"]
    assert lines[1].split()[:3] == ["line1/rpm", "1250.5", "2023-11-14T22:14:05.000Z"]
    assert lines[2].split()[:3] == ["temp", "59", "2023-11-14T22:23:50.000Z"]
    doc = json.loads(run_edgefleet("telemetry", "latest", DEVICE, "--json", env=served).stdout)
    assert [m["metric"] for m in doc["metrics"]] == ["line1/rpm", "temp"]

    since, until = iso(T0), iso(T0 + 600)
    args = ("telemetry", "query", DEVICE, "temp", "--since", since, "--until", until)
    found = json.loads(run_edgefleet(*args, "--every", "2m", "--json", env=served).stdout)
    assert found["every"] == 120.0
    assert [(b["count"], b["min"], b["max"]) for b in found["buckets"]] == [
        (12, 12.0 * k, 12.0 * k + 11) for k in range(5)
    ]
    shown = run_edgefleet(*args, "--every", "5m", env=served).stdout.splitlines()
    assert shown[1].split() == ["BUCKET", "(UTC)", "COUNT", "MIN", "AVG", "MAX"]
    assert shown[2].split() == ["2023-11-14T22:10:00.000Z", "6", "0", "2.5", "5"]
    assert shown[3].split() == ["2023-11-14T22:15:00.000Z", "30", "6", "20.5", "35"]

    bad = run_edgefleet(*args, "--every", "soon", env=served, check=False)
    assert bad.returncode != 0 and bad.stdout == ""
    assert "not a duration" in bad.stderr
    unknown = run_edgefleet("telemetry", "latest", "nope-nope", env=served, check=False)
    assert unknown.returncode != 0 and "404" in unknown.stderr


@sqlite_only
def test_cli_export_writes_csv(served: dict[str, str]) -> None:
    args = ("--since", iso(T0), "--until", iso(T0 + 600), "--metric", "line1/rpm")
    done = run_edgefleet("telemetry", "export", DEVICE, *args, env=served)
    assert done.stdout.splitlines() == [
        "ts,time,metric,value",
        f"{T0!r},2023-11-14T22:14:00+00:00,line1/rpm,1200.0",
        f"{T0 + 5!r},2023-11-14T22:14:05+00:00,line1/rpm,1250.5",
    ]


class _Lines:
    """Lines a subprocess prints, read by a thread so a test can wait on them with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait(self, count: int, timeout: float = 15.0) -> list[list[str]]:
        wait_for(lambda: len(self.lines) >= count, timeout, what=f"{count} lines of output")
        return [line.split() for line in self.lines[:count]]


@sqlite_only
def test_cli_tail_follows_new_samples(served: dict[str, str], known: GatewayRuntime) -> None:
    proc = subprocess.Popen(
        [*edgefleet_command(), "telemetry", "tail", DEVICE, "--interval", "1s"],
        env=clean_env(served),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        out = _Lines(proc.stdout)
        first = out.wait(2)  # the newest value of each metric
        assert [line[1:] for line in first] == [["line1/rpm", "1250.5"], ["temp", "59"]]
        TelemetryStore(known.engine).write(
            [IncomingBatch(DEVICE, 5, [Sample("temp", T0 + 600, 60.5)])], received_at=T0 + 600
        )
        assert out.wait(3)[2] == ["2023-11-14T22:24:00.000Z", "temp", "60.5"]
        proc.send_signal(signal.SIGINT)  # Ctrl-C ends it
        assert proc.wait(10) == 130
        assert len(out.lines) == 3  # nothing printed twice
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_cli_times_are_durations_ago_or_iso_times() -> None:
    now = 1_700_000_000.0
    assert parse_when("1h", now) == now - 3600
    assert parse_when("90s", now) == now - 90
    assert parse_when("2023-11-14T22:13:20Z", now) == 1_700_000_000.0
    assert parse_when("2023-11-14T23:13:20+01:00", now) == 1_700_000_000.0
    assert parse_when("2023-11-14T22:13:20", now) == 1_700_000_000.0  # no zone: UTC
    with pytest.raises(CommandError, match="not a time"):
        parse_when("last tuesday", now)
