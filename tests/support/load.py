"""Load against a real gateway: a crowd of API clients, a telemetry stream, a health prober.

Used by tests/test_load.py (which asserts) and bench/overload_bench.py (which prints). Each load
source is a process of its own, so none shares a GIL with the gateway or with what measures it:

- `Crowd` runs `python -m tests.support.load crowd`: ``concurrency`` clients, each with its own
  connection, sending requests back to back across the three roles (admin, operator, viewer)
  until told to stop; it reports every status code and the requests served per second.
- `Stream` runs `python -m tests.support.load stream`: devices publishing QoS 1 telemetry batches
  at a steady rate (or as fast as possible, to find the ingest's ceiling), each batch's samples
  stamped with its publish time.
- `HealthProbe` (a thread of the caller) asks ``/healthz`` every 20 ms on a kept-alive
  connection and keeps each answer's time.

The ingest's latency comes from the gateway's own histogram, ``edgefleet_telemetry_lag_seconds``
(publish to commit of each batch), read from ``/metrics`` before and after a phase.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from provisioning import keys
from provisioning.mqtt import MqttEndpoint
from tests.support import local_http
from tests.support.accounts import person_token

# ---- what the gateway says about itself --------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    """Every sample of ``/metrics`` as ``{"name{labels}": value}``."""
    text = local_http.get(url + "/metrics", timeout=10).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def lag_buckets(metrics: dict[str, float]) -> list[tuple[float, float]]:
    """The lag histogram's cumulative buckets: ``[(upper bound, count), ...]``."""
    prefix = 'edgefleet_telemetry_lag_seconds_bucket{le="'
    buckets = []
    for key, count in metrics.items():
        if key.startswith(prefix):
            bound = key[len(prefix) : -2]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), count))
    return sorted(buckets)


def percentile_between(
    before: list[tuple[float, float]], after: list[tuple[float, float]], q: float
) -> float:
    """The q-quantile of what was observed between two scrapes (linear within a bucket)."""
    counts = [(bound, a - b) for (bound, a), (_, b) in zip(after, before, strict=True)]
    total = counts[-1][1]
    if total <= 0:
        raise ValueError("nothing was observed between the two scrapes")
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in counts:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            share = (rank - lower_count) / max(count - lower_count, 1e-9)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def stored_batches(url: str) -> float:
    return scrape(url).get("edgefleet_telemetry_batches_stored_total", 0.0)


# ---- the fleet -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadFleet:
    """Tokens of the three roles, enrolled devices (with their broker credentials), a device id
    the readers ask about."""

    url: str
    tokens: dict[str, str]
    devices: list[dict[str, Any]]
    ca_file: Path


def prepare_fleet(url: str, admin_token: str, workdir: Path, devices: int = 4) -> LoadFleet:
    headers = {"Authorization": f"Bearer {admin_token}"}
    tokens = {"admin": admin_token}
    for role in ("operator", "viewer"):  # people of these roles, logged in for their tokens
        tokens[role] = person_token(url, admin_token, role)["token"]
    provisioning = local_http.post(
        url + "/api/v1/provisioning-tokens", json={"uses": devices}, headers=headers
    )
    provisioning.raise_for_status()
    secret = provisioning.json()["token"]
    enrolled = []
    for n in range(devices):
        key = keys.public_key_pem(keys.generate_private_key().public_key())
        response = local_http.post(
            url + "/api/v1/enroll", json={"token": secret, "public_key": key, "name": f"load-{n}"}
        )
        response.raise_for_status()
        enrolled.append(response.json())
    ca_file = workdir / "load-ca.pem"
    ca_file.write_text(enrolled[0]["broker"]["ca_cert"])
    return LoadFleet(url, tokens, enrolled, ca_file)


# ---- the crowd of API clients ----------------------------------------------------------------


def _requests(fleet: dict[str, Any]) -> list[tuple[str, str]]:
    device = fleet["device_id"]
    return [
        ("viewer", "/api/v1/devices"),
        ("viewer", f"/api/v1/devices/{device}"),
        ("viewer", f"/api/v1/devices/{device}/telemetry/latest"),
        # A live chart: the last ten seconds of a metric the devices send.
        ("viewer", f"/api/v1/devices/{device}/telemetry/load?since={{now_minus_10}}"),
        ("viewer", "/api/v1/flows/releases"),
        ("operator", "/api/v1/provisioning-tokens"),
        ("operator", "/api/v1/deployments"),
        ("operator", "/api/v1/audit?limit=50"),
        ("admin", "/api/v1/api-tokens"),
        ("admin", "/api/v1/devices?include_revoked=true"),
    ]


async def _crowd(spec: dict[str, Any]) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stopped() -> None:  # the parent writes a line: stop
        loop.remove_reader(sys.stdin.fileno())
        stop.set()

    loop.add_reader(sys.stdin.fileno(), stopped)
    codes: Counter[str] = Counter()
    plan = _requests(spec)
    limits = httpx.Limits(max_connections=spec["concurrency"], max_keepalive_connections=None)
    timeout = httpx.Timeout(spec["timeout"])
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=spec["url"], limits=limits, timeout=timeout) as client:

        async def one_client(n: int) -> None:
            rng = random.Random(n)
            while not stop.is_set():
                role, path = rng.choice(plan)
                path = path.replace("{now_minus_10}", f"{time.time() - 10:.3f}")
                headers = {"Authorization": f"Bearer {spec['tokens'][role]}"}
                try:
                    response = await client.get(path, headers=headers)
                    codes[str(response.status_code)] += 1
                except httpx.TimeoutException:
                    codes["timeout"] += 1
                except httpx.HTTPError as exc:
                    codes[type(exc).__name__] += 1

        tasks = [asyncio.create_task(one_client(n)) for n in range(spec["concurrency"])]
        print("ready", flush=True)
        await stop.wait()
        elapsed = time.monotonic() - started
        await asyncio.gather(*tasks)
    return {"codes": dict(codes), "seconds": elapsed}


class Crowd:
    """``concurrency`` API clients in a process of their own, until `stop`."""

    def __init__(self, fleet: LoadFleet, concurrency: int = 300, timeout: float = 30.0) -> None:
        spec = {
            "url": fleet.url,
            "tokens": fleet.tokens,
            "device_id": fleet.devices[0]["device_id"],
            "concurrency": concurrency,
            "timeout": timeout,
        }
        self._proc = _spawn("crowd", spec)
        _expect(self._proc, "ready")

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self) -> CrowdResult:
        return CrowdResult(**_finish(self._proc))


@dataclass(frozen=True)
class CrowdResult:
    codes: dict[str, int]
    seconds: float

    @property
    def total(self) -> int:
        return sum(self.codes.values())

    @property
    def served_per_second(self) -> float:
        served = sum(n for code, n in self.codes.items() if code.startswith("2"))
        return served / self.seconds


# ---- the telemetry stream --------------------------------------------------------------------


def _stream(spec: dict[str, Any]) -> dict[str, Any]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from provisioning.telemetry import encode_batch

    clients = []
    for device in spec["devices"]:
        broker = device["broker"]
        endpoint = MqttEndpoint(
            "127.0.0.1",
            broker["port"],
            True,
            broker["username"],
            broker["password"],
            Path(spec["ca_file"]),
        )
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=broker["client_id"], protocol=mqtt.MQTTv5
        )
        endpoint.configure(client)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        client.connect(endpoint.host, endpoint.port)
        client.loop_start()
        clients.append((client, f"{spec['prefix']}/{device['device_id']}/telemetry"))
    for client, _ in clients:
        deadline = time.monotonic() + 10
        while not client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.01)
    print("ready", flush=True)
    rate, count, samples = spec["rate"], spec["count"], spec["samples"]
    start = time.monotonic()
    infos = []
    seq = spec["first_seq"]
    for n in range(count):
        if rate:
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        client, topic = clients[n % len(clients)]
        now = time.time()
        rows = [("load", now, float(v)) for v in range(samples)]
        infos.append(client.publish(topic, encode_batch(seq + n // len(clients), rows), qos=1))
    for info in infos:
        info.wait_for_publish(30)
    seconds = time.monotonic() - start
    for client, _ in clients:
        client.disconnect()
        client.loop_stop()
    return {"published": count, "seconds": seconds}


class Stream:
    """Publish `count` batches of `samples` samples at `rate` per second (0: as fast as possible)
    from the fleet's devices; `wait` returns once all are acknowledged by the broker."""

    def __init__(
        self, fleet: LoadFleet, *, rate: float, count: int, samples: int, first_seq: int
    ) -> None:
        spec = {
            "devices": fleet.devices,
            "ca_file": str(fleet.ca_file),
            "prefix": "fleet",
            "rate": rate,
            "count": count,
            "samples": samples,
            "first_seq": first_seq,
        }
        self._proc = _spawn("stream", spec)
        _expect(self._proc, "ready")

    def wait(self, timeout: float = 300) -> dict[str, Any]:
        return _finish(self._proc, timeout)


# ---- the health prober -----------------------------------------------------------------------


@dataclass
class HealthProbe:
    """GET /healthz every `interval` seconds on one kept-alive connection, in a thread."""

    port: int
    interval: float = 0.02
    seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                conn.request("GET", "/healthz")
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    self.failures.append(str(response.status))
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(type(exc).__name__)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self.seconds.append(time.perf_counter() - started)
            self._stop.wait(self.interval)
        conn.close()

    def stop(self) -> HealthProbe:
        self._stop.set()
        self._thread.join(15)
        return self

    def percentile(self, q: float) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- the child processes ---------------------------------------------------------------------


def _spawn(role: str, spec: dict[str, Any]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.load", role],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec) + "\n")
    proc.stdin.flush()
    return proc


def _expect(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != word:
        proc.kill()
        raise RuntimeError(f"load process said {line!r} instead of {word!r}")


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write("stop\n")
        proc.stdin.flush()
    except BrokenPipeError:
        pass
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"load process exited with {proc.returncode}: {out[-2000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["crowd", "stream"])
    args = parser.parse_args()
    spec = json.loads(sys.stdin.readline())
    result = asyncio.run(_crowd(spec)) if args.role == "crowd" else _stream(spec)
    print(json.dumps(result), flush=True)


# ---- one measured run: ceiling, quiet, loaded --------------------------------------------------


@dataclass
class LoadFigures:
    ceiling: float
    """Batches per second the ingest stored at full speed (quiet), this run."""
    publisher_bound: bool
    """The publisher, not the ingest, was the limit of the ceiling run."""
    rate: float
    samples: int
    quiet_lag_p50: float
    quiet_lag_p99: float
    loaded_lag_p50: float
    loaded_lag_p99: float
    quiet_health: HealthProbe
    loaded_health: HealthProbe
    crowd: CrowdResult
    concurrency: int
    cpu: dict[str, float] = field(default_factory=dict)
    """Cores each process used during the loaded phase (CPU seconds per second)."""

    def report(self) -> str:
        codes = ", ".join(f"{n} x {code}" for code, n in sorted(self.crowd.codes.items()))
        limit = " (publisher-bound)" if self.publisher_bound else ""
        q, lo = self.quiet_health, self.loaded_health
        return "\n".join(
            [
                f"ingest ceiling     {self.ceiling:9.0f} batches/s of {self.samples} samples"
                f"{limit}; streamed at {self.rate:.0f}/s",
                f"API crowd          {self.concurrency} clients, {self.crowd.total} requests in "
                f"{self.crowd.seconds:.1f} s: {codes}",
                f"served             {self.crowd.served_per_second:9.0f} requests/s "
                f"(503: {self.crowd.codes.get('503', 0)})",
                f"/healthz           quiet p50 {q.percentile(0.5) * 1000:6.1f} ms  p99 "
                f"{q.percentile(0.99) * 1000:6.1f} ms | loaded p50 "
                f"{lo.percentile(0.5) * 1000:6.1f} ms  p99 {lo.percentile(0.99) * 1000:6.1f} ms",
                f"ingest latency     quiet p50 {self.quiet_lag_p50 * 1000:6.1f} ms  p99 "
                f"{self.quiet_lag_p99 * 1000:6.1f} ms | loaded p50 "
                f"{self.loaded_lag_p50 * 1000:6.1f} ms  p99 {self.loaded_lag_p99 * 1000:6.1f} ms",
                "cores used, loaded " + ", ".join(f"{k} {v:.2f}" for k, v in self.cpu.items()),
            ]
        )


def _wait_stored(url: str, count: float, timeout: float = 120) -> float:
    """Wait until `count` batches are stored; the time it happened (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stored_batches(url) >= count:
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError(f"the gateway did not store {count:.0f} batches in {timeout:.0f} s")


def _paced_phase(
    url: str, port: int, fleet: LoadFleet, rate: float, count: int, samples: int, seq: int
) -> tuple[float, float, HealthProbe]:
    expected = stored_batches(url) + count
    before = lag_buckets(scrape(url))
    stream = Stream(fleet, rate=rate, count=count, samples=samples, first_seq=seq)
    probe = HealthProbe(port)
    stream.wait()
    _wait_stored(url, expected)
    probe.stop()
    after = lag_buckets(scrape(url))
    return percentile_between(before, after, 0.5), percentile_between(before, after, 0.99), probe


def measure(
    url: str,
    port: int,
    fleet: LoadFleet,
    *,
    seconds: float,
    samples: int = 20,
    concurrency: int = 300,
    ceiling_batches: int = 12_000,
    pids: dict[str, int] | None = None,
) -> LoadFigures:
    # The ceiling: as fast as the publisher can; from its first publish to the last commit.
    expected = stored_batches(url) + ceiling_batches
    burst = Stream(fleet, rate=0, count=ceiling_batches, samples=samples, first_seq=1)
    started = time.monotonic()
    published = burst.wait()
    done = _wait_stored(url, expected)
    ceiling = ceiling_batches / (done - started)
    publisher_bound = published["seconds"] > 0.9 * (done - started)
    rate = ceiling / 2
    count = int(rate * seconds)
    quiet = _paced_phase(url, port, fleet, rate, count, samples, seq=10_000_000)
    crowd = Crowd(fleet, concurrency)
    watched = {**(pids or {}), "crowd": crowd.pid}
    before = _cpu_seconds(watched)
    started = time.monotonic()
    try:
        loaded = _paced_phase(url, port, fleet, rate, count, samples, seq=20_000_000)
    finally:
        elapsed = time.monotonic() - started
        after = _cpu_seconds(watched)
        crowd_result = crowd.stop()
    cpu = {name: (after[name] - before[name]) / elapsed for name in after if name in before}
    return LoadFigures(
        ceiling=ceiling,
        publisher_bound=publisher_bound,
        rate=rate,
        samples=samples,
        quiet_lag_p50=quiet[0],
        quiet_lag_p99=quiet[1],
        loaded_lag_p50=loaded[0],
        loaded_lag_p99=loaded[1],
        quiet_health=quiet[2],
        loaded_health=loaded[2],
        crowd=crowd_result,
        concurrency=concurrency,
        cpu=cpu,
    )


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User and system CPU seconds of each process, read from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[name] = (int(fields[11]) + int(fields[12])) / tick
    return found


if __name__ == "__main__":
    _main()
