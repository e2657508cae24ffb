"""Provisioning figures: enrollments per second, JWT-authenticated agent calls per second, and
the time to list the registry, against a real `edgefleet gateway run` (SQLite, or PostgreSQL with
--db). Keys are made before timing starts (key generation happens on each machine, not here).

    python -m bench.enroll_bench [--devices 300] [--db postgresql://postgres@127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from provisioning import keys
from provisioning.jwt_rules import sign_device_token
from tests.support.gateway_process import GatewayProcess


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=300)
    parser.add_argument("--db", help="a fresh PostgreSQL database URL (default: SQLite)")
    args = parser.parse_args()
    extra = ["--db", args.db] if args.db else []
    with (
        tempfile.TemporaryDirectory() as tmp,
        GatewayProcess(Path(tmp) / "gw", extra_args=extra) as gateway,
    ):
        admin = {"Authorization": f"Bearer {gateway.admin_token}"}
        http = httpx.Client(base_url=gateway.url + "/api/v1", timeout=30)
        token = http.post(
            "/provisioning-tokens", json={"uses": args.devices}, headers=admin
        ).json()["token"]
        pairs = [keys.generate_private_key() for _ in range(args.devices)]

        enroll_s: list[float] = []
        enrolled: list[tuple[str, str, object]] = []
        started = time.perf_counter()
        for key in pairs:
            t0 = time.perf_counter()
            body = http.post(
                "/enroll",
                json={"token": token, "public_key": keys.public_key_pem(key.public_key())},
            ).json()
            enroll_s.append(time.perf_counter() - t0)
            enrolled.append((body["device_id"], body["gateway_id"], key))
        enroll_total = time.perf_counter() - started

        calls_s: list[float] = []
        started = time.perf_counter()
        for device_id, audience, key in enrolled:
            jwt = sign_device_token(key, device_id, audience)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            assert http.get("/agent/self", headers={"Authorization": f"Bearer {jwt}"}).is_success
            calls_s.append(time.perf_counter() - t0)
        calls_total = time.perf_counter() - started

        t0 = time.perf_counter()
        listed = http.get("/devices", headers=admin).json()
        list_s = time.perf_counter() - t0
        assert len(listed) == args.devices

    backend = "PostgreSQL" if args.db else "SQLite"
    print(
        f"edgefleet provisioning bench ({backend}, {args.devices} machines, one client, loopback)"
    )
    print("  enroll (token use + device row + broker credential + audit, one transaction):")
    print(
        f"    {args.devices / enroll_total:8.1f} enrollments/s  p50 "
        f"{statistics.median(enroll_s) * 1000:.1f} ms  p99 {_pct(enroll_s, 0.99) * 1000:.1f} ms"
    )
    print("  agent call with a fresh ES256 JWT (verify + replay guard):")
    print(
        f"    {args.devices / calls_total:8.1f} calls/s        p50 "
        f"{statistics.median(calls_s) * 1000:.1f} ms  p99 {_pct(calls_s, 0.99) * 1000:.1f} ms"
    )
    print(f"  devices list of {args.devices}: {list_s * 1000:.1f} ms")


if __name__ == "__main__":
    main()
