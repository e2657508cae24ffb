"""Telemetry storage: compaction into chunks and rollups, queries over every form, retention
by whole units, the series limit (each test on SQLite and on PostgreSQL).

The expected answers come from the samples the test wrote, computed here in plain Python: the
database must give them for raw data, for compacted data, for rollups and for mixtures (late
samples in windows already compacted), and the same numbers before and after.
"""

from __future__ import annotations

import logging
import math
import random
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.broker.mosquitto import MosquittoSupervisor
from gateway.db import make_engine, migrate
from gateway.settings import GatewaySettings
from gateway.telemetry import partitions, queries
from gateway.telemetry.compaction import Compactor
from gateway.telemetry.maintenance import TelemetryMaintenance
from gateway.telemetry.models import chunks, rollups_1h, rollups_1m
from gateway.telemetry.retention import Retention
from gateway.telemetry.store import IncomingBatch, TelemetryStore, count_samples
from provisioning.telemetry import Sample, encode_batch
from tests.support.mosquitto import MqttProbe, running_broker
from tests.support.telemetry import register, running_ingest, wait_values
from tests.support.waiting import wait_for

H = 3600
T0 = 1_700_002_800.0  # a multiple of 3600: 2023-11-14T23:00:00Z


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(GatewaySettings(db_url=db_url).database_url)
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def tele_broker() -> Iterator[MosquittoSupervisor]:
    with running_broker() as supervisor:
        yield supervisor


def _device() -> str:
    return f"dev-{uuid.uuid4().hex[:10]}"


def machine_hours(device: str, start: float, hours: int, seed: int = 7) -> list[IncomingBatch]:
    """A machine at 1 Hz: a temperature with two decimals, a counter and an on/off state, all
    three stamped alike per second (one POST), with the millisecond jitter of time.time()."""
    rng = random.Random(seed)
    temp, count, state = 41.0, 1_000_000.0, 0.0
    batches = []
    for second in range(hours * H):
        ts = start + second + rng.uniform(0.0, 0.004)
        temp = round(temp + rng.choice((-0.02, -0.01, 0.0, 0.01, 0.02)), 2)
        count += rng.randint(0, 5)
        if rng.random() < 0.003:
            state = 1.0 - state
        batches.append(
            IncomingBatch(
                device,
                second + 1,
                [Sample("temp", ts, temp), Sample("count", ts, count), Sample("on", ts, state)],
            )
        )
    return batches


def write(engine: Engine, batches: list[IncomingBatch], received_at: float = T0) -> None:
    store = TelemetryStore(engine)
    for start in range(0, len(batches), 500):
        store.write(batches[start : start + 500], received_at)


def samples_of(batches: list[IncomingBatch], metric: str) -> list[tuple[float, float]]:
    return sorted((ts, v) for b in batches for m, ts, v in b.samples if m == metric)


def expected_buckets(
    rows: list[tuple[float, float]], since: float, until: float, every: float
) -> list[tuple[float, int, float, float, float]]:
    found: dict[float, list[float]] = {}
    for ts, value in rows:
        if since <= ts < until:
            found.setdefault(math.floor(ts / every) * every, []).append(value)
    return [
        (start, len(vs), min(vs), max(vs), math.fsum(vs) / len(vs))
        for start, vs in sorted(found.items())
    ]


def assert_buckets_equal(got: list[queries.Bucket], want: list[tuple[float, ...]]) -> None:
    assert [(b.start, b.count, b.min, b.max) for b in got] == [w[:4] for w in want]
    # avg is sum/count; a sum added up in another order may differ in its last bits
    for bucket, wanted in zip(got, want, strict=True):
        assert bucket.avg == pytest.approx(wanted[4], rel=1e-12, abs=1e-12)


QUERIES = [  # (since, until, every): rollup-served, mixed at the edges, raw-only widths
    (T0, T0 + 3 * H, 3600.0),
    (T0 + 1234.5, T0 + 3 * H - 17.25, 3600.0),
    (T0 + 59.5, T0 + 2 * H + 61.0, 300.0),
    (T0 - 5, T0 + 3 * H + 5, 60.0),
    (T0 + 1800.2, T0 + 5400.7, 7.0),
    (T0 + 3599.0, T0 + 3601.5, 1.0),
    (T0, T0 + 3 * H, 90.0),
    (T0, T0 + 4 * H, 7200.0),
]


def check_queries(engine: Engine, device: str, batches: list[IncomingBatch]) -> None:
    with engine.connect() as conn:
        latest = {x.metric: (x.ts, x.value) for x in queries.latest(conn, device)}
    for metric in ("temp", "count", "on"):
        rows = samples_of(batches, metric)
        assert latest[metric] == rows[-1], metric
        with engine.connect() as conn:
            exported = [(ts, v) for _m, ts, v in queries.export_rows(conn, device, metric, 0, 1e10)]
        assert exported == rows, metric  # bit for bit, in time order
        for since, until, every in QUERIES:
            with engine.connect() as conn:
                got = queries.buckets(conn, device, metric, since, until, every)
            assert_buckets_equal(got, expected_buckets(rows, since, until, every))


def raw_count(engine: Engine) -> int:
    with engine.connect() as conn:
        raw = queries.raw_source(conn)
        return int(conn.execute(sa.select(sa.func.count()).select_from(raw)).scalar_one())


def test_compaction_keeps_every_answer_and_late_samples_join_their_chunks(engine: Engine) -> None:
    device = _device()
    if engine.dialect.name == "postgresql":  # the first two hours in partitions, the third not
        with engine.connect() as conn:
            partitions.ensure_raw(conn, T0 - 2 * H)  # windows T0-2h .. T0+1h
            conn.commit()
    batches = machine_hours(device, T0, 3)
    write(engine, batches)
    check_queries(engine, device, batches)  # raw

    compactor = Compactor(engine, compact_after=600)
    result = compactor.run_once(now=T0 + 3 * H + 600)  # all three windows closed
    assert result.samples == 3 * 3 * H
    assert result.windows == {T0, T0 + H, T0 + 2 * H}
    assert raw_count(engine) == 0
    assert count_samples(engine, device) == 3 * 3 * H
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(chunks.c.series_id, chunks.c.times_series_id, chunks.c.ts_data)
        ).all()
        assert len(stored) == 9  # one chunk per series and window
        owners = [sid for sid, times, _ in stored if sid == times]
        assert len(owners) == 3  # per window, the three series share one copy of the times
        assert all((data is None) == (sid != times) for sid, times, data in stored)
        assert conn.execute(sa.select(sa.func.count()).select_from(rollups_1m)).scalar() == 540
        assert conn.execute(sa.select(sa.func.count()).select_from(rollups_1h)).scalar() == 9
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            assert partitions.sealed_raw(conn) == []
            assert T0 not in partitions.attached_raw(conn)
    check_queries(engine, device, batches)  # compacted and rolled up

    # Late samples for a compacted window (a machine back from an outage) and a new hour.
    late = [
        IncomingBatch(device, 100_000 + i, [Sample("temp", T0 + H + 0.5 + 97 * i, 99.99)])
        for i in range(30)
    ] + machine_hours(device, T0 + 3 * H, 1, seed=8)[:100]
    late = [IncomingBatch(device, 200_000 + i, b.samples) for i, b in enumerate(late)]
    write(engine, late)
    everything = batches + late
    check_queries(engine, device, everything)  # compacted + raw in the same windows
    again = compactor.run_once(now=T0 + 5 * H)
    assert again.samples == len(late) * 1 + 100 * 2  # 30 single temps, 100 seconds of three
    assert raw_count(engine) == 0
    check_queries(engine, device, everything)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(chunks)).scalar() == 12


def _bits(rows: list[tuple[str, float, float]]) -> list[tuple[str, bytes, bytes]]:
    return sorted((m, struct.pack("<d", t), struct.pack("<d", v)) for m, t, v in rows)


def test_values_and_times_come_back_bit_for_bit_after_compaction(engine: Engine) -> None:
    """The extremes of the raw round-trip test, compacted: the same bits before and after (and
    on PostgreSQL the bits written; SQLite's own REAL storage keeps -0.0 as 0)."""
    device = _device()
    values = [0.0, -0.0, -3.5, 1e-300, 5e-324, 1.7976931348623157e308, 2.0**53 + 2, 0.1 + 0.2]
    times = [1.0, 1_700_000_000.123456, 4_102_444_800.000001]
    samples = [Sample(f"m{i}", times[i % 3], v) for i, v in enumerate(values)]
    TelemetryStore(engine).write([IncomingBatch(device, 1, samples)], time.time())

    def read() -> tuple[dict[str, tuple[float, float]], list[tuple[str, float, float]]]:
        with engine.connect() as conn:
            latest = {x.metric: (x.ts, x.value) for x in queries.latest(conn, device)}
            exported = list(queries.export_rows(conn, device, None, 0, 5e9))
        return latest, exported

    raw_latest, raw_export = read()
    result = Compactor(engine, compact_after=1).run_once(now=5e9)
    assert result.samples == len(samples)
    assert raw_count(engine) == 0
    latest, exported = read()
    assert latest == {m: (t, v) for m, t, v in samples}
    assert _bits(exported) == _bits(raw_export)
    assert _bits([(m, *tv) for m, tv in latest.items()]) == _bits(
        [(m, *tv) for m, tv in raw_latest.items()]
    )
    if engine.dialect.name == "postgresql":
        assert _bits(exported) == _bits([(m, t, v) for m, t, v in samples])


def test_rollups_answer_a_long_range_after_the_samples_are_gone(engine: Engine) -> None:
    device = _device()
    batches = machine_hours(device, T0, 2)
    write(engine, batches)
    now = T0 + 40 * 86400
    maintenance = TelemetryMaintenance(
        engine, compact_after=600, retention=30 * 86400, rollup_retention=365 * 86400
    )
    maintenance.run_once(now=T0 + 3 * H, retention=False)  # compacted
    kept = Retention(engine, 30 * 86400, 365 * 86400).run_once(now)
    assert kept.dropped[partitions.CHUNK_PARENT] == 2  # the two hours straddle midnight
    assert kept.dropped["telemetry_rollups_1h"] == 0
    rows = samples_of(batches, "temp")
    with engine.connect() as conn:
        assert queries.latest(conn, device) == []  # no sample is left
        assert list(queries.export_rows(conn, device, "temp", 0, now)) == []
        hourly = queries.buckets(conn, device, "temp", T0, T0 + 2 * H, 3600)
        assert queries.buckets(conn, device, "temp", T0, T0 + 2 * H, 30) == []  # raw only
    assert_buckets_equal(hourly, expected_buckets(rows, T0, T0 + 2 * H, 3600))
    gone = Retention(engine, 30 * 86400, 365 * 86400).run_once(T0 + 400 * 86400)
    assert gone.dropped["telemetry_rollups_1m"] == 1
    with engine.connect() as conn:
        assert queries.buckets(conn, device, "temp", T0, T0 + 2 * H, 3600) == []


def test_retention_drops_old_units_while_the_ingest_stores_new_samples(
    engine: Engine, tele_broker: MosquittoSupervisor
) -> None:
    device = _device()
    endpoint = register(engine, tele_broker, device)
    now = time.time()
    old_start = partitions.floor_to(now - 3 * 86400, 86400)
    old = machine_hours(device, old_start, 2)
    write(engine, old, received_at=old_start)
    maintenance = TelemetryMaintenance(engine, compact_after=600, retention=2 * 86400)
    assert maintenance.run_once(now=now, retention=False).compaction is not None
    assert count_samples(engine, device) == len(old) * 3
    stop = threading.Event()
    passes: list[object] = []

    def maintain() -> None:  # retention and compaction, again and again, beside the ingest
        while not stop.is_set():
            passes.append(maintenance.run_once(now=time.time(), retention=True))

    with running_ingest(tele_broker, engine) as (ingest, _log), MqttProbe(endpoint, device) as pub:
        assert not pub.connect().is_failure
        worker = threading.Thread(target=maintain)
        worker.start()
        try:
            for seq in range(1, 201):
                payload = encode_batch(
                    1_000_000 + seq,
                    [Sample("n", time.time(), float(v)) for v in range(seq * 5, seq * 5 + 5)],
                )
                pub.client.publish(f"fleet/{device}/telemetry", payload, qos=1)
            values = wait_values(engine, device, 1000, timeout=30)
            wait_for(lambda: len(passes) >= 2, 30, what="two maintenance passes")
        finally:
            stop.set()
            worker.join()
    assert values == [float(v) for v in range(5, 1005)]
    assert count_samples(engine, device) == 1000  # the old days went, whole
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(chunks)).scalar() == 0
        hours = conn.execute(sa.select(sa.func.count()).select_from(rollups_1h)).scalar()
    assert hours == 6  # rollups are kept longer: 2 hours x 3 series
    assert ingest.metrics.value("write_errors_total") == 0


def test_a_device_gets_a_limited_number_of_series(
    engine: Engine, tele_broker: MosquittoSupervisor, caplog: pytest.LogCaptureFixture
) -> None:
    device = _device()
    endpoint = register(engine, tele_broker, device)
    caplog.set_level(logging.WARNING, logger="gateway.telemetry.ingest")
    now = time.time()
    with (
        running_ingest(tele_broker, engine, max_series_per_device=3) as (ingest, log),
        MqttProbe(endpoint, device) as pub,
    ):
        assert not pub.connect().is_failure
        for seq in range(1, 6):  # each batch: the known metrics and two new ones
            names = ["a", "b", "c", f"x{seq}", f"y{seq}"]
            pub.publish(
                f"fleet/{device}/telemetry",
                encode_batch(seq, [Sample(n, now + seq, float(seq)) for n in names]),
            )
        wait_for(lambda: len(log.seqs(device)) == 5, 15, what="five batches handled")
    with engine.connect() as conn:
        latest = {x.metric: x.value for x in queries.latest(conn, device)}
    assert latest == {"a": 5.0, "b": 5.0, "c": 5.0}
    assert ingest.metrics.refused_count("series_limit") == 5
    assert ingest.metrics.value("series_refused_samples_total") == 10
    logged = [r.getMessage() for r in caplog.records if "(series_limit)" in r.getMessage()]
    assert len(logged) == 1 and device in logged[0], logged


@pytest.mark.postgres
def test_an_existing_install_keeps_its_samples_through_the_migration(tmp_path: Path) -> None:
    """A database at the revision before compaction, with samples in it, upgraded in place:
    on PostgreSQL the old samples table becomes the default partition (nothing is copied);
    every sample is still there, and the compaction then works through them."""
    for url in _fresh_urls(tmp_path):
        engine = make_engine(url)
        try:
            _upgrade(engine, "0007")
            device = _device()
            batches = machine_hours(device, T0, 2)
            with engine.begin() as conn:  # the old schema, written as the old gateway wrote it
                conn.execute(
                    sa.text("INSERT INTO telemetry_series (device_id, metric) VALUES (:d, :m)"),
                    [{"d": device, "m": m} for m in ("count", "on", "temp")],
                )
                ids = dict(conn.execute(sa.text("SELECT metric, id FROM telemetry_series")).all())
                conn.execute(
                    sa.text(
                        "INSERT INTO telemetry_samples (series_id, ts, value) VALUES (:s, :t, :v)"
                    ),
                    [{"s": ids[m], "t": t, "v": v} for b in batches for m, t, v in b.samples],
                )
            migrate(engine)
            if engine.dialect.name == "postgresql":
                with engine.connect() as conn:
                    kind = conn.execute(
                        sa.text("SELECT relkind FROM pg_class WHERE relname = 'telemetry_samples'")
                    ).scalar()
                    assert kind == "p"  # partitioned, the old rows in its default partition
                    assert (
                        conn.execute(
                            sa.text("SELECT count(*) FROM ONLY telemetry_samples_default")
                        ).scalar()
                        == len(batches) * 3
                    )
            check_queries(engine, device, batches)
            Compactor(engine, compact_after=600).run_once(now=T0 + 3 * H)
            assert raw_count(engine) == 0
            check_queries(engine, device, batches)
        finally:
            engine.dispose()


def _upgrade(engine: Engine, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    from gateway.db import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def _fresh_urls(tmp_path: Path) -> Iterator[str]:
    """An empty SQLite file and an empty PostgreSQL database (not the migrated templates)."""
    yield f"sqlite:///{tmp_path / 'old.db'}"
    from tests.conftest import _pg_admin, _pg_url

    name = f"edgefleet_old_{uuid.uuid4().hex[:8]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield GatewaySettings(db_url=_pg_url(name)).database_url
    finally:
        with _pg_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
