"""Telemetry storage figures: bytes per sample, compaction throughput, query times, and the
ingest rate with the compaction running beside it, next to the ceilings of its parts.

Run: ``.venv/bin/python bench/telemetry_storage_bench.py`` after ``scripts/setup.sh`` (several
minutes; ``--quick`` for a smaller pass; ``--only storage`` or ``--only ingest``; ``--pg URL``).
Every database is a fresh one, dropped afterwards.

storage (PostgreSQL and SQLite):
  - bytes per sample, tables + indexes + TOAST, for one hour of realistic data: machines with
    20 series at 1 Hz (8 temperatures with two decimals, 6 counters, 6 on/off states) whose
    readings of one second share a timestamp (one POST from Node-RED, stamped by the agent with
    time.time(), millisecond jitter); the same with a timestamp of its own per series; and
    random floats. Raw (as the ingest wrote them) and compacted (chunks + minute and hourly
    rollups); batch keys apart (one per message of 20 samples, kept like raw samples);
  - compaction throughput: samples per second of wall time, and per core (CPU seconds of this
    process plus the database server's, PostgreSQL only);
  - query times of one metric over 1 h, 1 day and 30 days with 30 days at 1 Hz stored, at the
    widths a chart asks for (about 500 buckets), raw (before compaction) and compacted/rolled up
    (median of 5).
ingest (PostgreSQL, the supervised Mosquitto, ingest in its own process as in
`telemetry_ingest_bench.py`, 100 samples a message), in one run:
  - a bare paho subscriber draining the same broker (messages/s): the broker's ceiling;
  - a bare binary COPY of the same rows into the samples table: the database's ceiling;
  - the ingest with the compaction stopped, then with it compacting a backlog beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import telemetry_ingest_bench as ingest_bench

from gateway.broker.dynsec import DynsecAdmin, generate_password
from gateway.broker.mosquitto import MosquittoSupervisor
from gateway.db import make_engine
from gateway.settings import GatewaySettings
from gateway.telemetry import partitions, queries
from gateway.telemetry.compaction import Compactor
from gateway.telemetry.store import (
    _COPY_HEADER,
    _COPY_ROW,
    _COPY_SAMPLES,
    IncomingBatch,
    TelemetryStore,
)

PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
H = 3600
TABLES = {
    "raw": ["telemetry_samples", "telemetry_samples_sealed"],
    "compacted": ["telemetry_chunks", "telemetry_rollups_1m", "telemetry_rollups_1h"],
    "keys": ["telemetry_batches"],
}


# ---- databases ------------------------------------------------------------------------------


@contextlib.contextmanager
def database(kind: str, pg_admin: str, workdir: Path) -> Iterator[Engine]:
    """A fresh, migrated database (the ingest bench's, devices and all), dropped afterwards."""
    with ingest_bench.database(kind, pg_admin, workdir) as url:
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


def table_bytes(engine: Engine, tables: list[str]) -> int:
    """Bytes on disk of ``tables``: heap, indexes and TOAST, partitions and children included."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("CHECKPOINT")
            total = 0
            for table in tables:
                total += int(
                    conn.execute(
                        sa.text(
                            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) "
                            "FROM pg_class c WHERE c.relname = :t OR c.oid IN ("
                            "SELECT inhrelid FROM pg_inherits "
                            "WHERE inhparent = CAST(:t AS regclass))"
                        ),
                        {"t": table},
                    ).scalar_one()
                )
            return total
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        names = ",".join(f"'{t}'" for t in tables)
        indexes = ",".join(
            f"'{n}'"
            for (n,) in conn.exec_driver_sql(
                f"SELECT name FROM sqlite_master WHERE tbl_name IN ({names})"  # noqa: S608
            )
        )
        return int(
            conn.exec_driver_sql(
                f"SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name IN ({indexes})"  # noqa: S608
            ).scalar_one()
        )


# ---- data -----------------------------------------------------------------------------------


def machine(
    device: str, start: float, seconds: int, rng: random.Random, *, shared: bool, kind: str
) -> list[IncomingBatch]:
    """One machine's batches: one message per second with its 20 readings."""
    temps = [rng.uniform(20, 80) for _ in range(8)]
    counters = [float(rng.randint(0, 10**6)) for _ in range(6)]
    states = [float(rng.random() < 0.5) for _ in range(6)]
    out = []
    for second in range(seconds):
        base = start + second + rng.uniform(0.0, 0.004)
        readings = []
        for i in range(20):
            ts = base if shared else start + second + rng.uniform(0.0, 0.004)
            if kind == "random":
                value = rng.random() * 1000.0
            elif i < 8:
                temps[i] = round(temps[i] + rng.choice((-0.02, -0.01, 0.0, 0.0, 0.01, 0.02)), 2)
                value = temps[i]
            elif i < 14:
                counters[i - 8] += rng.randint(0, 3)
                value = counters[i - 8]
            else:
                if rng.random() < 0.002:
                    states[i - 14] = 1.0 - states[i - 14]
                value = states[i - 14]
            readings.append((f"m{i:02d}", ts, value))
        out.append(IncomingBatch(device, second + 1, readings))
    return out


def raw_partitions(engine: Engine, start: float, end: float) -> None:
    """PostgreSQL: the hourly partitions `gateway run` would have made for ``[start, end)``, so
    the data takes the normal path (partition, sealed, compacted, dropped); SQLite: nothing."""
    if engine.dialect.name != "postgresql":
        return
    with engine.connect() as conn:
        for window in range(int(start), int(end), (partitions.RAW_AHEAD + 1) * H):
            partitions.ensure_raw(conn, window)
        conn.commit()


def write(engine: Engine, batches: list[IncomingBatch], received_at: float) -> None:
    store = TelemetryStore(engine)
    for start in range(0, len(batches), 1000):
        store.write(batches[start : start + 1000], received_at)


def postgres_cpu() -> float:
    return ingest_bench.postgres_cpu()


# ---- storage --------------------------------------------------------------------------------


def bytes_per_sample(kind: str, args: argparse.Namespace, workdir: Path) -> None:
    machines = 5 if args.quick else 20
    start = partitions.floor_to(time.time(), H) - 6 * H
    for label, shared, data in (
        ("realistic, shared timestamps", True, "realistic"),
        ("realistic, own timestamps", False, "realistic"),
        ("random floats, shared timestamps", True, "random"),
    ):
        with database(kind, args.pg, workdir) as engine:
            raw_partitions(engine, start, start + H)
            rng = random.Random(1)
            total = 0
            for m in range(machines):
                batches = machine(f"bench-{m:03d}", start, H, rng, shared=shared, kind=data)
                total += sum(len(b.samples) for b in batches)
                write(engine, batches, start)
            raw = table_bytes(engine, TABLES["raw"])
            keys = table_bytes(engine, TABLES["keys"])
            cpu0, pg0, wall0 = time.process_time(), postgres_cpu(), time.perf_counter()
            result = Compactor(engine, compact_after=60).run_once(now=start + 3 * H)
            wall = time.perf_counter() - wall0
            cpu = time.process_time() - cpu0 + (postgres_cpu() - pg0 if kind == "postgresql" else 0)
            assert result.samples == total, (result.samples, total)
            parts = {t: table_bytes(engine, [t]) for t in TABLES["compacted"]}
            compacted = sum(parts.values())
            left = table_bytes(engine, TABLES["raw"])
            split = ", ".join(
                f"{t.removeprefix('telemetry_')} {n / total:.2f}" for t, n in parts.items()
            )
            print(
                f"{kind:10} {label:34} {total:>9,} samples: raw {raw / total:6.1f} B/sample, "
                f"compacted {compacted / total:5.2f} B/sample "
                f"(raw tables left: {left / total:.2f}), "
                f"batch keys {keys / total:4.1f} B/sample; compaction {total / wall:>9,.0f} "
                f"samples/s, {total / cpu:>9,.0f} samples/s per core\n{'':11}compacted = {split}",
                flush=True,
            )


def timed(run: Any, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def query_times(kind: str, args: argparse.Namespace, workdir: Path) -> None:
    days = 7 if args.quick else 30
    end = partitions.floor_to(time.time(), H) - H
    start = end - days * 86400
    rng = np.random.default_rng(2)
    n = days * 86400
    ts = start + np.arange(n, dtype=np.float64) + rng.uniform(0, 0.004, n)
    values = np.round(40 + np.cumsum(rng.choice([-0.01, 0.0, 0.01], n)), 2)
    with database(kind, args.pg, workdir) as engine:
        raw_partitions(engine, start, end + H)
        store = TelemetryStore(engine)
        pairs = list(zip(ts.tolist(), values.tolist(), strict=True))
        for i in range(0, n, 100_000):
            chunk = [("temp", t, v) for t, v in pairs[i : i + 100_000]]
            store.write([IncomingBatch("chart-01", i + 1, chunk)], end)
        spans = {"1 h": H, "1 day": 86400, f"{days} days": days * 86400}

        def measure(label: str) -> None:
            line = []
            for name, span in spans.items():
                since, until = end - span, end
                every = queries.auto_every(since, until)

                def run(since: float = since, until: float = until, every: float = every) -> None:
                    with engine.connect() as conn:
                        queries.buckets(conn, "chart-01", "temp", since, until, every)

                line.append(f"{name} ({every:g}s buckets) {timed(run):7.1f} ms")
            print(
                f"{kind:10} {days} days at 1 Hz stored, {label:10}: " + "; ".join(line), flush=True
            )

        measure("raw")
        Compactor(engine, compact_after=60).run_once(now=end + 2 * H)
        measure("compacted")

        def exact() -> None:
            with engine.connect() as conn:
                queries.buckets(conn, "chart-01", "temp", start, end, 30)

        print(
            f"{kind:10} {days} days in 30 s buckets from decoded chunks (no rollup fits): "
            f"{timed(exact, 3):.0f} ms",
            flush=True,
        )


# ---- ingest beside the compaction, and the ceilings ----------------------------------------


def bare_subscriber(
    broker: MosquittoSupervisor, devices_file: Path, messages: int, workdir: Path
) -> float:
    """Messages/s a plain paho client (QoS 1, automatic acks) drains from the same broker."""
    got = threading.Event()
    count = [0, 0.0]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-{uuid.uuid4().hex[:6]}",
                         protocol=mqtt.MQTTv5)  # fmt: skip
    broker.endpoint.configure(client)
    subscribed = threading.Event()

    def on_message(*_a: Any) -> None:
        count[0] += 1
        if count[0] == messages:
            count[1] = time.time()
            got.set()

    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.on_connect = lambda c, *_a: c.subscribe("$share/gateway/fleet/+/telemetry", qos=1)
    client.connect(broker.endpoint.host, broker.endpoint.port)
    client.loop_start()
    subscribed.wait(10)
    endpoint = json.dumps(ingest_bench.endpoint_doc(broker.endpoint))
    publisher = ingest_bench._child(
        "publish", "--devices", str(devices_file), "--endpoint", endpoint,
        "--messages", str(messages), "--batch", "100", "--seq-base", str(time.time_ns() // 1000),
    )  # fmt: skip
    ingest_bench._expect_ready(publisher, "the publisher")
    assert publisher.stdin is not None and publisher.stdout is not None
    publisher.stdin.write("go\n")
    publisher.stdin.flush()
    report = json.loads(publisher.stdout.readline())
    ingest_bench.reap(publisher)
    got.wait(300)
    client.disconnect()
    client.loop_stop()
    return messages / (count[1] - report["started"])


def bare_copy(url: str, messages: int) -> float:
    """Rows/s of binary COPY of the same rows (100 a message, 2,000 messages a transaction)."""
    engine = make_engine(url)
    now = time.time()
    rows = [
        _COPY_ROW.pack(3, 4, 1 + (i % 20), 8, now + i * 1e-3, 8, float(i)) for i in range(200_000)
    ]
    total = messages * 100
    started = time.perf_counter()
    with engine.connect() as conn:
        driver = conn.connection.driver_connection
        assert driver is not None
        done = 0
        while done < total:
            n = min(200_000, total - done)
            with driver.cursor() as cursor, cursor.copy(_COPY_SAMPLES) as copy:
                copy.write(b"".join((_COPY_HEADER, *rows[:n], b"\xff\xff")))
            driver.commit()
            done += n
    seconds = time.perf_counter() - started
    engine.dispose()
    return total / seconds


def compaction_process(url: str, stop_file: Path, out: Path, pace: float) -> subprocess.Popen[str]:
    code = (
        "import sys, time, json, pathlib\n"
        "from gateway.db import make_engine\n"
        "from gateway.telemetry.compaction import Compactor\n"
        "engine = make_engine(sys.argv[1])\n"
        "c = Compactor(engine, compact_after=60, pace=float(sys.argv[4]))\n"
        "started = time.time(); done = c.run_once().samples; ended = time.time()\n"
        "stop = pathlib.Path(sys.argv[2])\n"
        "while not stop.exists():\n"
        "    done += c.run_once().samples\n"
        "out = {'samples': done, 'started': started, 'ended': ended}\n"
        "pathlib.Path(sys.argv[3]).write_text(json.dumps(out))\n"
    )
    argv = [sys.executable, "-c", code, url, str(stop_file), str(out), str(pace)]
    return subprocess.Popen(argv, text=True)


def ingest_beside_compaction(args: argparse.Namespace, workdir: Path) -> None:
    messages = 3000 if args.quick else 6000
    broker = MosquittoSupervisor(workdir / "gw", ingest_bench.free_port(), bind="127.0.0.1")
    broker.start()
    try:
        devices = []
        with DynsecAdmin(broker.endpoint) as admin:
            for i in range(ingest_bench.DEVICES):
                password = generate_password()
                admin.add_device(f"bench-{i:02d}", password)
                devices.append({"id": f"bench-{i:02d}", "password": password})
        devices_file = workdir / "devices.json"
        devices_file.write_text(json.dumps(devices))
        print(f"{os.cpu_count()} CPUs; ingest: {messages} messages of 100 samples", flush=True)
        ceiling = bare_subscriber(broker, devices_file, messages, workdir)
        print(f"ceiling: bare paho subscriber drains {ceiling:,.0f} msg/s "
              f"({ceiling * 100:,.0f} samples/s)", flush=True)  # fmt: skip
        with ingest_bench.database("postgresql", args.pg, workdir) as url:
            copy_rate = bare_copy(url, messages)
            print(
                f"ceiling: bare binary COPY into telemetry_samples: {copy_rate:,.0f} rows/s",
                flush=True,
            )
        with ingest_bench.database("postgresql", args.pg, workdir) as url:
            engine = make_engine(url)
            with engine.connect() as conn:
                partitions.ensure_raw(conn, time.time())
                conn.commit()
            stopped = ingest_bench.measure(
                broker, devices_file, url, "postgresql", 100, 1, messages, 0.0, workdir
            )
            rate = stopped.msgs_per_s
            print(
                f"ingest, compaction stopped : {rate:,.0f} msg/s, {rate * 100:,.0f} samples/s = "
                f"{rate / ceiling:.0%} of the broker's ceiling, {rate * 100 / copy_rate:.0%} of "
                "COPY's",
                flush=True,
            )
            backlog_start = partitions.floor_to(time.time(), H) - 30 * H
            rng = random.Random(3)
            backlog = 0
            hours = 6 if args.quick else 12
            raw_partitions(engine, backlog_start, backlog_start + hours * H)
            for m in range(4):
                batches = machine(
                    f"backlog-{m}", backlog_start, hours * H, rng, shared=True, kind="realistic"
                )
                backlog += sum(len(b.samples) for b in batches)
                write(engine, batches, backlog_start)
            stop_file, out = workdir / "stop-compaction", workdir / "compaction.json"
            pace = args.pace
            compactor = compaction_process(url, stop_file, out, pace)
            time.sleep(1.0)
            beside = ingest_bench.measure(
                broker, devices_file, url, "postgresql", 100, 1, messages, 0.0, workdir
            )
            stop_file.touch()
            compactor.wait(600)
            done = json.loads(out.read_text())
            compacted = done["samples"]
            # The ingest run began about a second after the compaction: how much of the run
            # had the compaction at work beside it.
            overlap = (done["ended"] - done["started"] - 1.0) / beside.seconds
            side = beside.msgs_per_s
            print(
                f"ingest, compaction beside it: {side:,.0f} msg/s, {side * 100:,.0f} samples/s "
                f"({side / rate:.0%} of the rate without it, {beside.seconds:.1f}s); the "
                f"compaction (pace {pace:g}) took {done['ended'] - done['started']:.1f}s for "
                f"{compacted:,} of a {backlog:,}-sample backlog (at work during "
                f"{min(1.0, overlap):.0%} of the ingest run)",
                flush=True,
            )
            engine.dispose()
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["storage", "queries", "ingest"])
    parser.add_argument("--db", choices=["sqlite", "postgresql"], help="storage/queries: one only")
    parser.add_argument("--pg", default=PG_DEFAULT, help="PostgreSQL server (admin URL)")
    parser.add_argument(
        "--pace",
        type=float,
        default=GatewaySettings().telemetry_compact_pace,
        help="ingest: the compaction's pace beside it (default: gateway run's)",
    )
    args = parser.parse_args()
    kinds = [args.db] if args.db else ["postgresql", "sqlite"]
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        workdir = Path(tmp)
        if args.only in (None, "storage"):
            for kind in kinds:
                bytes_per_sample(kind, args, workdir)
        if args.only in (None, "queries"):
            for kind in kinds:
                query_times(kind, args, workdir)
        if args.only in (None, "ingest"):
            ingest_beside_compaction(args, workdir)


if __name__ == "__main__":
    main()
