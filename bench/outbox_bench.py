"""Device-side telemetry figures: outbox intake rate, memory at 1M queued, drain rate, parsing.

Run: ``.venv/bin/python bench/outbox_bench.py`` (about a minute). It starts its own
``mosquitto`` on a free port in a temporary directory for the drain figure and removes it after.

Prints:
- ``Outbox.add`` samples/s for calls of 1, 10, 100 and 1000 samples (one commit per call);
- RSS before and after queueing 1,000,000 samples, and the database size;
- drain rate of those samples through `TelemetrySender` to the local broker (PUBACKed, acked
  out of the outbox), at the outbox's batch size;
- `parse_batch` batches/s at 1, 10 and 100 samples per batch, beside a ``json.loads`` + hand
  checks reference, the alternative `provisioning.telemetry` was chosen against.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pwd
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.telemetry.outbox import Outbox
from edge_agent.telemetry.sender import TelemetrySender
from provisioning.telemetry import METRIC_PATTERN, Sample, encode_batch, parse_batch

MiB = 1024 * 1024


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def samples(start: int, count: int) -> list[Sample]:
    now = time.time()
    return [Sample(f"sensor_{i % 20}", now, float(i)) for i in range(start, start + count)]


def bench_add(workdir: Path, total: int) -> None:
    print("Outbox.add (validate + store, one transaction per call):")
    for chunk in (1, 10, 100, 1000):
        path = workdir / f"add-{chunk}.db"
        count = min(total, chunk * 5000)
        data = samples(0, chunk)
        with Outbox(path) as outbox:
            started = time.perf_counter()
            for _ in range(count // chunk):
                outbox.add(data)
            elapsed = time.perf_counter() - started
        print(f"  {chunk:>5} samples/call: {count / elapsed:>10,.0f} samples/s")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


@contextmanager
def mosquitto(workdir: Path) -> Iterator[int]:
    """A plain local Mosquitto with persistence, on a free port; stopped and reaped after.

    A consumer subscribed to the telemetry (``mosquitto_sub``, a process of its own) stands in
    for the gateway: Mosquitto drops telemetry nobody subscribed to (PUBACK 0x10, "no matching
    subscribers") and the sender keeps such batches, so without one nothing would drain.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    (workdir / "store").mkdir()
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
        f"persistence true\npersistence_location {workdir / 'store'}/\n"
    )
    with (workdir / "mosquitto.log").open("wb") as log:
        proc = subprocess.Popen(["mosquitto", "-c", str(config)], stdout=log, stderr=log)
    consumer: subprocess.Popen[bytes] | None = None
    try:
        wait(lambda: _port_open(port), 10, "mosquitto to listen")
        consumer_log = workdir / "consumer.log"
        # line-buffered, so the SUBACK line shows up in its log at once
        argv = ["stdbuf", "-oL", "mosquitto_sub", "-p", str(port), "-q", "1", "-d"]
        with consumer_log.open("wb") as out:
            consumer = subprocess.Popen(
                [*argv, "-t", "fleet/+/telemetry"], stdout=out, stderr=subprocess.STDOUT
            )
        wait(lambda: b"SUBACK" in consumer_log.read_bytes(), 10, "the consumer's SUBACK")
        yield port
    finally:
        if consumer is not None:
            consumer.terminate()
            consumer.wait(timeout=10)
        proc.terminate()
        proc.wait(timeout=10)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def bench_million_and_drain(workdir: Path, total: int, batch_size: int, inflight: int) -> None:
    before = rss()
    path = workdir / "million.db"
    with Outbox(path, max_samples=max(total, 1_000_000), batch_size=batch_size) as outbox:
        chunk = 1000
        started = time.perf_counter()
        for start in range(0, total, chunk):
            outbox.add(samples(start, chunk))
        filled = time.perf_counter() - started
        held = rss()
        size = sum(
            Path(f"{path}{s}").stat().st_size for s in ("", "-wal") if Path(f"{path}{s}").exists()
        )
        print(f"Queued {len(outbox):,} samples in {filled:.1f}s ({total / filled:,.0f} samples/s)")
        print(
            f"  RSS {before / MiB:.1f} MiB before, {held / MiB:.1f} MiB holding them "
            f"(+{(held - before) / MiB:.1f} MiB); database {size / MiB:.0f} MiB on disk"
        )
        with mosquitto(workdir) as port:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id="bench-device", protocol=mqtt.MQTTv5
            )
            client.max_inflight_messages_set(max(20, inflight))
            sender = TelemetrySender(
                client, "fleet/bench-device/telemetry", outbox, max_inflight=inflight
            )

            def on_connect(c: mqtt.Client, u: Any, f: Any, rc: ReasonCode, p: Any) -> None:
                if not rc.is_failure:
                    sender.on_connect()

            def on_publish(c: mqtt.Client, u: Any, mid: int, rc: ReasonCode, p: Any) -> None:
                sender.on_publish(mid, rc)

            client.on_connect = on_connect
            client.on_publish = on_publish
            client.on_disconnect = lambda *_: sender.on_disconnect()
            client.connect("127.0.0.1", port)
            client.loop_start()
            peak = [held]
            done = threading.Event()

            def watch_rss() -> None:
                while not done.wait(0.2):
                    peak[0] = max(peak[0], rss())

            watcher = threading.Thread(target=watch_rss, daemon=True)
            watcher.start()
            started = time.perf_counter()
            sender.start()
            wait(lambda: len(outbox) == 0, 600, "the outbox to drain")
            elapsed = time.perf_counter() - started
            done.set()
            sender.stop()
            client.disconnect()
            client.loop_stop()
            batches = sender.stats().acked
            print(
                f"Drained to local mosquitto (batch {batch_size}, {inflight} in flight): "
                f"{total / elapsed:,.0f} samples/s, {batches / elapsed:,.0f} batches/s "
                f"({elapsed:.1f}s); peak RSS while draining {peak[0] / MiB:.1f} MiB"
            )


# A reference parser with the same rules, written with json + hand checks: what the pydantic
# TypeAdapter in provisioning.telemetry was measured against.
_METRIC = re.compile(METRIC_PATTERN)


def _refuse(name: str) -> Any:
    raise ValueError(name)


_DECODER = json.JSONDecoder(parse_constant=_refuse)


def hand_parse(payload: bytes, now: float, skew: float) -> list[Sample]:
    doc = _DECODER.decode(payload.decode())
    if type(doc) is not dict or doc.get("v") != 1 or type(doc.get("seq")) is not int:
        raise ValueError("schema")
    latest = now + skew
    known: set[str] = set()
    out = []
    for item in doc["samples"]:
        if type(item) is not dict or len(item) != 3:
            raise ValueError("schema")
        m, t, v = item["m"], item["t"], item["v"]
        if m not in known:
            if type(m) is not str or not _METRIC.fullmatch(m):
                raise ValueError("schema")
            known.add(m)
        if type(v) is not float or not math.isfinite(v):
            if type(v) is not int:
                raise ValueError("non_numeric")
            v = float(v)
        if type(t) not in (float, int) or not 0 < t <= latest:
            raise ValueError("timestamp")
        out.append(Sample(m, float(t), v))
    return out


def bench_parse(seconds: float) -> None:
    print("parse_batch (gateway side):")
    now = time.time()
    for size in (1, 10, 100):
        payload = encode_batch(42, samples(0, size))
        figures = []
        ours = partial(parse_batch, payload, max_bytes=1 << 20, max_samples=1000, now=now)
        reference = partial(hand_parse, payload, now, 300.0)
        for parse in (ours, reference):
            count = 0
            started = time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds:
                for _ in range(200):
                    parse()
                count += 200
            figures.append(count / elapsed)
        print(
            f"  {size:>3} samples/batch: {figures[0]:>9,.0f} batches/s "
            f"({figures[0] * size:>9,.0f} samples/s); json+hand checks {figures[1]:>9,.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000, help="queued for RSS/drain")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--inflight", type=int, default=10)
    parser.add_argument("--parse-seconds", type=float, default=2.0)
    args = parser.parse_args()
    print(f"edgefleet outbox bench: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="edgefleet-outbox-bench-") as tmp:
        workdir = Path(tmp)
        bench_million_and_drain(workdir, args.samples, args.batch_size, args.inflight)
        bench_add(workdir, 500_000)
    bench_parse(args.parse_seconds)


if __name__ == "__main__":
    main()
