"""Under load the gateway sheds politely and its MQTT side keeps up: a real `edgefleet gateway
run` on the embedded defaults (SQLite, its Mosquitto), 300 API clients at once across the three
roles while four devices stream telemetry at half the ingest's ceiling, measured in the same run.

Holds: no 500 and no client timeout (a request is served or refused with 503 and Retry-After),
``/healthz`` p99 under 200 ms throughout, and the ingest's latency p99 (publish to commit, the
gateway's ``edgefleet_telemetry_lag_seconds``) within twice its figure without the API load.
bench/overload_bench.py runs the same and prints the figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway_process import GatewayProcess
from tests.support.load import LoadFigures, LoadFleet, measure, prepare_fleet

PHASE_SECONDS = 8.0


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with GatewayProcess(tmp_path_factory.mktemp("load") / "data") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def fleet(gw: GatewayProcess, tmp_path_factory: pytest.TempPathFactory) -> LoadFleet:
    return prepare_fleet(gw.url, gw.admin_token, Path(tmp_path_factory.mktemp("fleet")))


@pytest.mark.xfail(
    reason="KNOWN, being fixed (issue 12): the ingest's p99 under the crowd is > 2x quiet "
    "(the API and the ingest share one interpreter lock)",
    strict=False,
)
def test_300_clients_and_a_telemetry_stream_at_half_the_ceiling(
    gw: GatewayProcess, fleet: LoadFleet
) -> None:
    assert gw.proc is not None
    pids = {"gateway": gw.proc.pid, "mosquitto": gw.broker_pid()}
    figures: LoadFigures = measure(gw.url, gw.http_port, fleet, seconds=PHASE_SECONDS, pids=pids)
    print(figures.report())
    codes = figures.crowd.codes
    assert set(codes) <= {"200", "503"}, codes  # never a 500, a timeout or a dropped connection
    assert codes.get("200", 0) > 0
    assert not figures.loaded_health.failures and not figures.quiet_health.failures
    assert figures.loaded_health.percentile(0.99) < 0.200, figures.report()
    assert figures.loaded_lag_p99 <= 2 * figures.quiet_lag_p99, figures.report()
    assert "Traceback" not in gw.log_text()
