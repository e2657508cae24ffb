"""Gateway telemetry ingest figures: samples/s into SQLite and PostgreSQL, and latency.

Run: ``.venv/bin/python bench/telemetry_ingest_bench.py`` after ``scripts/setup.sh`` (a few
minutes; ``--quick`` for a shorter pass, ``--only postgresql``, ``--pg URL`` for another server,
``--replicas 1 2 3`` to compare replica counts on PostgreSQL).

Everything is real and separate, as in production: the broker is the gateway's own supervised
Mosquitto (TLS, dynamic security, persistence) in a temporary directory; each ingest replica is
a process of its own running `TelemetryIngest` (what `edgefleet gateway run` starts); the load
is a separate process publishing QoS 1 batches as several enrolled devices. PostgreSQL runs
get a fresh database each, dropped afterwards.

For each database and batch size (1, 10, 100 samples per message) and one or two replicas:

- throughput: messages and samples per second from the first publish to the last commit
  (publisher at full speed, so this is the ingest's ceiling on this machine, sharing its cores
  with the broker, the database and the load generator);
- latency from the device's publish to the committed row (each batch carries its publish time
  as the samples' timestamp; the ingest records its commit time): p50/p99, at full speed
  (mostly queueing) and in a paced run at a steady rate below the ceiling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine
from sqlmodel import Session

from gateway.broker.dynsec import DynsecAdmin, generate_password
from gateway.broker.mosquitto import MosquittoSupervisor
from gateway.db import make_engine, migrate
from gateway.registry.models import Device
from gateway.settings import GatewaySettings
from gateway.telemetry.ingest import IngestOptions, TelemetryIngest
from gateway.telemetry.metrics import TelemetryMetrics
from gateway.telemetry.models import batches
from gateway.telemetry.store import WriteResult
from provisioning.mqtt import MqttEndpoint
from provisioning.wire import Topics

DEVICES = 8
METRICS = 20
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"


def endpoint_doc(endpoint: MqttEndpoint) -> dict[str, Any]:
    doc = asdict(endpoint)
    doc["ca_file"] = str(endpoint.ca_file) if endpoint.ca_file else None
    return doc


def endpoint_of(doc: dict[str, Any]) -> MqttEndpoint:
    ca = doc.pop("ca_file")
    return MqttEndpoint(**doc, ca_file=Path(ca) if ca else None)


# ---- the ingest replica (a process of its own) ---------------------------------------------


def run_ingest(args: argparse.Namespace) -> None:
    """Ingest until SIGTERM, then write what was committed when to ``args.out``."""
    engine = make_engine(args.db)
    latencies: list[float] = []
    commits: list[float] = []
    counts = {"batches": 0, "samples": 0}

    def committed(result: WriteResult, at: float) -> None:
        commits.append(at)
        counts["batches"] += len(result.stored)
        counts["samples"] += result.samples
        latencies.extend(at - batch.samples[0][1] for batch in result.stored)

    ingest = TelemetryIngest(
        endpoint_of(json.loads(args.endpoint)),
        engine,
        Topics(),
        IngestOptions(client_id=args.client_id),
        TelemetryMetrics(CollectorRegistry()),
        on_committed=committed,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ingest.start()
    print("ready", flush=True)
    stop.wait()
    ingest.stop()
    engine.dispose()
    Path(args.out).write_text(
        json.dumps({"latencies": latencies, "commits": commits, **counts}), encoding="utf-8"
    )


# ---- the load generator (a process of its own) ---------------------------------------------


def run_publish(args: argparse.Namespace) -> None:
    """One ``mosquitto_pub -l`` per device (a C client: the load costs little CPU), fed lines.

    Prints ``ready`` once every client is connected, waits for a line on stdin, then writes
    the batches (one JSON document per line, the samples stamped with the time they are
    written) and waits until every client has had its PUBACKs and exited.
    """
    devices = json.loads(Path(args.devices).read_text())
    base = endpoint_of(json.loads(args.endpoint))
    pubs = []
    for device in devices:
        argv = ["mosquitto_pub", "-h", base.host, "-p", str(base.port), "-V", "mqttv5",
                "-q", "1", "-M", str(args.inflight), "-l", "-i", device["id"],
                "-u", device["id"], "-P", device["password"],
                "-t", f"fleet/{device['id']}/telemetry"]  # fmt: skip
        if base.tls:
            argv += ["--cafile", str(base.ca_file)]
        pubs.append(
            subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=1 << 16)
        )
    time.sleep(1.0)  # mosquitto_pub says nothing when connected; give the TLS handshakes time
    for pub in pubs:
        if pub.poll() is not None:
            raise SystemExit(f"mosquitto_pub exited: {pub.stderr.read() if pub.stderr else ''}")
    print("ready", flush=True)
    sys.stdin.readline()
    sample = ",".join(f'{{"m":"m{i % METRICS}","t":%r,"v":%d.0}}' for i in range(args.batch))
    line = '{"v":1,"seq":%d,"samples":[' + sample + "]}\n"
    started = time.time()
    interval = 1.0 / args.rate if args.rate else 0.0
    count = len(pubs)
    for n in range(args.messages):
        now = time.time()
        if interval:
            delay = started + n * interval - now
            if delay > 0:
                time.sleep(delay)  # pacing the load, not waiting for a condition
                now = time.time()
        seq = args.seq_base + n // count + 1
        text = line % (seq, *((now, n) * args.batch))
        stream = pubs[n % count].stdin
        assert stream is not None
        stream.write(text.encode())
        if interval:
            stream.flush()
    cpu = 0.0
    for pub in pubs:
        assert pub.stdin is not None
        pub.stdin.close()
    for pub in pubs:
        _pid, status, usage = os.wait4(pub.pid, 0)
        cpu += usage.ru_utime + usage.ru_stime
        if status != 0:
            raise SystemExit(f"mosquitto_pub failed ({status})")
    finished = time.time()
    print(json.dumps({"started": started, "finished": finished, "clients_cpu": cpu}), flush=True)


# ---- the conductor ---------------------------------------------------------------------------


@dataclass
class Result:
    database: str
    batch: int
    replicas: int
    messages: int
    rate: float  # target publish rate, 0 = full speed
    seconds: float
    per_replica: list[int]
    latencies: list[float]
    cpu: dict[str, float]
    """CPU seconds used during the run by: ingest (all replicas), publisher, broker, postgres."""

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _child(role: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )


def _profile(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling a running child (whichever thread holds the GIL) until SIGINT."""
    spy = str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--gil", "-r", "200", "-f", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _expect_ready(proc: subprocess.Popen[str], what: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"{what} did not start (said {line!r}, exit {proc.poll()})")


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def postgres_cpu() -> float:
    """CPU seconds of every PostgreSQL server process (its backends come and go)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    total += cpu_of(int(entry.name))
            except OSError:
                continue
    return total


def reap(proc: subprocess.Popen[str], timeout: float = 60) -> float:
    """Wait for a child to exit and return the CPU seconds it used (its rusage)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, _status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = 0
            return float(usage.ru_utime + usage.ru_stime)
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.02)


def forget_session(endpoint: MqttEndpoint, client_id: str) -> None:
    """Drop a replica's persistent session, or the broker would keep routing it a share."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    endpoint.configure(client)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    done = threading.Event()
    client.on_connect = lambda *_a: done.set()
    client.connect(endpoint.host, endpoint.port, clean_start=True, properties=props)
    client.loop_start()
    done.wait(10)
    client.disconnect()
    client.loop_stop()


def stored(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(batches)).scalar_one())


@contextlib.contextmanager
def database(kind: str, pg_admin: str, workdir: Path) -> Iterator[str]:
    """A fresh, migrated database with the bench devices registered; its URL."""
    if kind == "sqlite":
        url = f"sqlite:///{workdir / f'bench-{uuid.uuid4().hex[:6]}.db'}"
        name = None
    else:
        name = f"edgefleet_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = GatewaySettings(db_url=f"{pg_admin.rsplit('/', 1)[0]}/{name}").database_url
    engine = make_engine(url)
    migrate(engine)
    with Session(engine) as session:
        for i in range(DEVICES):
            session.add(
                Device(
                    id=f"bench-{i:02d}",
                    name=f"bench-{i:02d}",
                    public_key="bench",
                    key_fingerprint=f"bench-{i:02d}",
                    enrolled_at=datetime.now(UTC),
                )
            )
        session.commit()
    engine.dispose()
    try:
        yield url
    finally:
        if name is not None:
            with psycopg.connect(pg_admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measure(
    broker: MosquittoSupervisor,
    devices_file: Path,
    db_url: str,
    kind: str,
    batch: int,
    replicas: int,
    messages: int,
    rate: float,
    workdir: Path,
) -> Result:
    endpoint = json.dumps(endpoint_doc(broker.endpoint))
    ids = [f"bench-ingest-{uuid.uuid4().hex[:6]}" for _ in range(replicas)]
    outs = [workdir / f"{cid}.json" for cid in ids]
    ingests = [
        _child("ingest", "--db", db_url, "--endpoint", endpoint, "--client-id", cid, "--out",
               str(out))
        for cid, out in zip(ids, outs, strict=True)
    ]  # fmt: skip
    engine = make_engine(db_url)
    spies: list[subprocess.Popen[bytes]] = []
    try:
        for proc in ingests:
            _expect_ready(proc, "an ingest replica")
        profile_dir = os.environ.get("BENCH_PROFILE_DIR")  # set it to see where the time goes
        if profile_dir and not rate:
            spies = [
                _profile(proc.pid, Path(profile_dir) / f"{kind}-b{batch}-r{replicas}-{n}.txt")
                for n, proc in enumerate(ingests)
            ]
        before = stored(engine)
        broker_pid = broker.pid or 0
        cpu_start = {"broker": cpu_of(broker_pid), "postgres": postgres_cpu()}
        cpu_start["ingest"] = sum(cpu_of(proc.pid) for proc in ingests)
        publisher = _child(
            "publish", "--devices", str(devices_file), "--endpoint", endpoint,
            "--messages", str(messages), "--batch", str(batch), "--rate", str(rate),
            "--seq-base", str(time.time_ns() // 1000),  # new keys for every run on one database
        )  # fmt: skip
        _expect_ready(publisher, "the publisher")
        assert publisher.stdin is not None and publisher.stdout is not None
        publisher.stdin.write("go\n")
        publisher.stdin.flush()
        report = json.loads(publisher.stdout.readline())
        publisher_cpu = reap(publisher) + report["clients_cpu"]
        deadline = time.monotonic() + 300
        while stored(engine) - before < messages:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {stored(engine) - before} of {messages} stored")
            time.sleep(0.05)
        cpu = {
            "ingest": sum(cpu_of(proc.pid) for proc in ingests) - cpu_start["ingest"],
            "publisher": publisher_cpu,
            "broker": cpu_of(broker_pid) - cpu_start["broker"],
            "postgres": postgres_cpu() - cpu_start["postgres"],
        }
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        for proc in ingests:
            proc.send_signal(signal.SIGTERM)
        for proc in ingests:
            proc.wait(60)
        engine.dispose()
        for cid in ids:
            forget_session(broker.endpoint, cid)
    docs = [json.loads(out.read_text()) for out in outs]
    last_commit = max(max(doc["commits"]) for doc in docs if doc["commits"])
    return Result(
        database=kind,
        batch=batch,
        replicas=replicas,
        messages=messages,
        rate=rate,
        seconds=last_commit - report["started"],
        per_replica=[int(doc["batches"]) for doc in docs],
        latencies=[lat for doc in docs for lat in doc["latencies"]],
        cpu=cpu,
    )


def print_result(result: Result) -> None:
    load = f"{result.rate:,.0f} msg/s paced" if result.rate else "full speed"
    print(
        f"{result.database:10} batch {result.batch:>3}  replicas {result.replicas}  {load:>18}: "
        f"{result.msgs_per_s:>9,.0f} msg/s  {result.msgs_per_s * result.batch:>9,.0f} samples/s  "
        f"latency p50 {result.percentile(0.5):>7.1f} ms  p99 {result.percentile(0.99):>7.1f} ms"
        f"  (split {'/'.join(map(str, result.per_replica))})",
        flush=True,
    )
    if not result.rate:
        used = "  ".join(
            f"{name} {seconds / result.seconds:.2f}" for name, seconds in result.cpu.items()
        )
        per_message = sum(result.cpu.values()) / result.messages * 1e6
        print(
            f"{'':>48}CPU cores busy: {used}; {per_message:,.0f} us CPU per message in all",
            flush=True,
        )


def conduct(args: argparse.Namespace) -> None:
    kinds = [args.only] if args.only else ["sqlite", "postgresql"]
    scale = 0.25 if args.quick else 1.0
    plan = {1: int(60_000 * scale), 10: int(30_000 * scale), 100: int(6_000 * scale)}
    plan = {size: count for size, count in plan.items() if size in args.batch_sizes}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        workdir = Path(tmp)
        broker = MosquittoSupervisor(workdir / "gw", free_port(), bind="127.0.0.1")
        broker.start()
        try:
            devices = []
            with DynsecAdmin(broker.endpoint) as admin:
                for i in range(DEVICES):
                    password = generate_password()
                    admin.add_device(f"bench-{i:02d}", password)
                    devices.append({"id": f"bench-{i:02d}", "password": password})
            devices_file = workdir / "devices.json"
            devices_file.write_text(json.dumps(devices))
            print(
                f"{os.cpu_count()} CPUs; broker: supervised Mosquitto (TLS); {DEVICES} devices, "
                f"{METRICS} metrics; load from a separate process",
                flush=True,
            )
            for kind in kinds:
                for batch, messages in plan.items():
                    for replicas in args.replicas if kind == "postgresql" else [1]:
                        with database(kind, args.pg, workdir) as url:
                            result = measure(
                                broker, devices_file, url, kind, batch, replicas, messages,
                                0.0, workdir,
                            )  # fmt: skip
                            print_result(result)
                            paced = float(max(10, round(result.msgs_per_s / 2, -1)))
                            steady = measure(
                                broker, devices_file, url, kind, batch, replicas,
                                int(paced * 3), paced, workdir,
                            )  # fmt: skip
                            print_result(steady)
        finally:
            broker.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["conduct", "ingest", "publish"], default="conduct")
    parser.add_argument("--quick", action="store_true", help="a quarter of the messages")
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    parser.add_argument("--pg", default=PG_DEFAULT, help="PostgreSQL server (admin URL)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument(
        "--replicas",
        type=int,
        nargs="+",
        default=[1, 2],
        help="ingest replicas to compare on PostgreSQL, e.g. 1 2 3 (SQLite: always one)",
    )
    # internal: the children
    parser.add_argument("--db")
    parser.add_argument("--endpoint")
    parser.add_argument("--client-id")
    parser.add_argument("--out")
    parser.add_argument("--devices")
    parser.add_argument("--messages", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--inflight", type=int, default=1000)
    parser.add_argument("--seq-base", type=int, default=0)
    args = parser.parse_args()
    {"conduct": conduct, "ingest": run_ingest, "publish": run_publish}[args.role](args)


if __name__ == "__main__":
    main()
