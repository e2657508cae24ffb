"""A replica killed (SIGKILL) in the middle of a compaction loses and duplicates nothing.

A real `edgefleet gateway run` compacts hours of samples written before it started; it is
killed while a compaction transaction is open (on PostgreSQL: while it reads a sealed window,
seen in pg_stat_activity; on SQLite: once some groups of the window are compacted and others not
yet). Every sample is then stored exactly once, raw or compacted, bit for bit; a second
`gateway run` finishes the work and the answer is still the same.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gateway.db import make_engine, migrate
from gateway.settings import GatewaySettings
from gateway.telemetry import partitions, queries
from gateway.telemetry.models import chunks, series
from gateway.telemetry.store import IncomingBatch, TelemetryStore, count_samples
from tests.support.gateway_process import GatewayProcess
from tests.support.waiting import wait_for

DEVICES = 5
METRICS = 10
H = 3600


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(GatewaySettings(db_url=db_url).database_url)
    migrate(engine)
    yield engine
    engine.dispose()


def _write_hours(engine: Engine, start: int, hours: int) -> None:
    store = TelemetryStore(engine)
    seq = 0
    for second in range(0, hours * H, 30):
        group = []
        for d in range(DEVICES):
            seq += 1
            group.append(
                IncomingBatch(
                    f"crash-{d:02d}",
                    seq,
                    [
                        (
                            f"m{m}",
                            start + second + k + d * 1e-3,
                            round(m + ((second + k) % 89) * 0.01, 2),
                        )
                        for k in range(30)
                        for m in range(METRICS)
                    ],
                )
            )
        store.write(group, start)


def _everything(engine: Engine) -> list[tuple[str, str, bytes, bytes]]:
    found = []
    with engine.connect() as conn:
        devices = conn.execute(sa.select(series.c.device_id).distinct()).scalars().all()
    for device in sorted(devices):
        with engine.connect() as conn:
            for metric, ts, value in queries.export_rows(conn, device, None, 0, 1e10):
                found.append((device, metric, struct.pack("<d", ts), struct.pack("<d", value)))
    return found


def _compacting(engine: Engine) -> bool:
    """A compaction is under way and not finished."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            reading = conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query "
                    "LIKE '%SELECT series_id, ts, value FROM telemetry_samples_p%'"
                )
            ).scalar()
            return bool(reading)
        done = conn.execute(sa.select(sa.func.count()).select_from(chunks)).scalar()
        raw = conn.execute(sa.text("SELECT count(*) FROM telemetry_samples")).scalar()
        return bool(done) and bool(raw)


def test_kill9_during_compaction_loses_and_duplicates_nothing(
    engine: Engine, db_url: str, tmp_path: Path
) -> None:
    start = partitions.floor_to(time.time(), H) - 5 * H
    if engine.dialect.name == "postgresql":  # windows in partitions, as the gateway makes them
        with engine.connect() as conn:
            partitions.ensure_raw(conn, start)
            conn.commit()
    _write_hours(engine, start, 2)
    before = _everything(engine)
    total = DEVICES * METRICS * 2 * H
    assert len(before) == total

    args = ["--telemetry-compact-after", "10m", "--db", db_url]
    env = {"EDGEFLEET_TELEMETRY_COMPACT_INTERVAL": "0.2"}
    gateway = GatewayProcess(tmp_path / "gw", extra_args=args, env=env).start()
    try:
        wait_for(lambda: _compacting(engine), 60, interval=0.01, what="a compaction under way")
        assert gateway.proc is not None
        os.kill(gateway.proc.pid, signal.SIGKILL)
        gateway.proc.wait(10)
    finally:
        gateway.stop(check=False)
    # Once PostgreSQL has noticed the dead connection, its transaction is gone.
    wait_for(lambda: count_samples(engine) == total, 30, what="every sample, once")
    assert _everything(engine) == before

    again = GatewayProcess(tmp_path / "gw", extra_args=args, env=env).start()
    try:

        def compacted() -> bool:
            with engine.connect() as conn:
                raw = queries.raw_source(conn)
                left = conn.execute(sa.select(sa.func.count()).select_from(raw)).scalar()
            return left == 0

        wait_for(compacted, 120, interval=0.2, what="the second gateway to finish the compaction")
    finally:
        again.stop()
    assert count_samples(engine) == total
    assert _everything(engine) == before
