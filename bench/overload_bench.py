"""The gateway under a crowd: requests/s served, 503s, /healthz and ingest latency, quiet vs loaded.

Run: ``.venv/bin/python -m bench.overload_bench`` after ``scripts/setup.sh`` (about a minute;
``--seconds`` per phase, ``--clients``, ``--samples`` per batch, ``--in-flight`` to try another
``EDGEFLEET_HTTP_MAX_IN_FLIGHT``).

One run of a real `edgefleet gateway run` on the embedded defaults (SQLite, its supervised
Mosquitto), four enrolled devices publishing QoS 1 telemetry and a crowd of API clients, each
load in a process of its own (tests/support/load.py):

1. the ingest's ceiling on this machine: batches published as fast as the publisher can, from
   its first publish to the gateway's last commit;
2. quiet: the devices stream at half that ceiling; /healthz is asked every 20 ms;
3. loaded: the same stream while ``--clients`` API clients (default 300) send requests back to
   back across the admin, operator and viewer roles.

Printed: the ceiling and the streamed rate, every status the crowd got and the requests served
per second, /healthz p50/p99 and the ingest's publish-to-commit latency p50/p99 (the gateway's
``edgefleet_telemetry_lag_seconds``), quiet beside loaded. tests/test_load.py asserts on the
same run: no 500, /healthz p99 under 200 ms, loaded ingest p99 within twice the quiet one.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from tests.support.gateway_process import GatewayProcess
from tests.support.load import measure, prepare_fleet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--clients", type=int, default=300, help="API clients at once")
    parser.add_argument("--samples", type=int, default=20, help="samples per telemetry batch")
    parser.add_argument("--ceiling-batches", type=int, default=30_000)
    parser.add_argument("--in-flight", type=int, help="EDGEFLEET_HTTP_MAX_IN_FLIGHT")
    args = parser.parse_args()
    env = {"EDGEFLEET_HTTP_MAX_IN_FLIGHT": str(args.in_flight)} if args.in_flight else {}
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="edgefleet-overload-") as tmp:
        gateway = GatewayProcess(Path(tmp) / "data", env=env).start()
        try:
            fleet = prepare_fleet(gateway.url, gateway.admin_token, Path(tmp))
            figures = measure(
                gateway.url,
                gateway.http_port,
                fleet,
                seconds=args.seconds,
                samples=args.samples,
                concurrency=args.clients,
                ceiling_batches=args.ceiling_batches,
                pids={"gateway": gateway.proc.pid, "mosquitto": gateway.broker_pid()}
                if gateway.proc is not None
                else None,
            )
        finally:
            gateway.stop()
    print(figures.report())
    print(f"machine: load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
