"""Bulk writes of telemetry batches, each stored exactly once per ``(device_id, seq)``.

One call of `TelemetryStore.write` is one transaction:

1. the batch keys go in with ``INSERT ... ON CONFLICT DO NOTHING RETURNING device_id, seq``
   (SQLAlchemy Core, which sends many rows per statement); what comes back is what is new;
2. the samples of exactly those batches go in: on PostgreSQL through ``COPY ... FROM STDIN``
   in binary format (see `_binary_copy`), on SQLite through one ``executemany``;
3. commit.

Before that transaction, the ``(device, metric)`` pairs are mapped to series ids (`SeriesIds`):
from memory when seen before, else created with ``INSERT ... ON CONFLICT DO NOTHING`` and read
back in a short transaction of their own. A series row whose samples are then rolled back is
harmless (an empty series), and replicas creating the same series at once agree on one id.

A device has at most ``max_series_per_device`` series: a new metric beyond that is refused and
its samples are left out of the write (the batch's other samples are stored); `WriteResult`
says which, for the ingest to count and log. The limit is checked against the database when a
series would be created (replicas creating series for one device at the same moment may pass it
by a few), and a refused metric is remembered for a minute so a device that keeps sending it
costs no query per batch.

A batch that was already stored (a redelivery after a reconnect, or the same message handed to
a replica that died before acknowledging it) returns no key in step 1, so its samples are not
written again, and the transaction makes "key stored" and "samples stored" one fact: a crash
between them leaves neither. Measured rates are in ``bench/telemetry_ingest_bench.py``.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from gateway.telemetry.models import batches, chunks, series
from gateway.telemetry.queries import raw_source
from provisioning.telemetry import SampleRow

_COPY_SAMPLES: Final = "COPY telemetry_samples (series_id, ts, value) FROM STDIN (FORMAT BINARY)"
# PostgreSQL's binary COPY format ("Binary Format" in the COPY page of its manual): a signature,
# a flags word and a header-extension length; per row the field count, then each field as its
# byte length and its big-endian value; -1 as the trailer. psycopg's `Copy.write_row` writes the
# same bytes but through two Python calls per row (measured: 2.6 us a row, the largest cost of
# a 100-sample batch); one `struct.pack` per row takes about a tenth of that.
_COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
_COPY_TRAILER: Final = struct.pack("!h", -1)
_COPY_ROW: Final = struct.Struct("!hiiidid")  # 3 fields: int4 series_id, float8 ts, float8 value
_INSERT_SAMPLES: Final = "INSERT INTO telemetry_samples (series_id, ts, value) VALUES (?, ?, ?)"
# PostgreSQL: the keys travel as four arrays in one fixed statement. A multi-row VALUES list
# (what Core's executemany sends) has a different text for every row count, which psycopg
# must parse into a new server-side statement each time: measured, that parsing alone took
# longer than the insert.
_INSERT_KEYS_PG: Final = sa.text(
    "INSERT INTO telemetry_batches (device_id, seq, received_at, samples) "
    "SELECT * FROM unnest(CAST(:device_ids AS varchar[]), CAST(:seqs AS bigint[]), "
    "CAST(:received AS double precision[]), CAST(:counts AS integer[])) "
    "ON CONFLICT DO NOTHING RETURNING device_id, seq"
)
_LOOKUP_CHUNK: Final = 500
DEFAULT_SERIES_CACHE: Final = 200_000
DEFAULT_MAX_SERIES_PER_DEVICE: Final = 1000
_REFUSED_FOR: Final = 60.0
_REFUSED_MAX: Final = 100_000

SeriesKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class IncomingBatch:
    """A validated batch and the device the broker vouched for (from the topic)."""

    device_id: str
    seq: int
    samples: Sequence[SampleRow]


@dataclass(frozen=True, slots=True)
class WriteResult:
    stored: list[IncomingBatch]
    """Batches written by this call, in the order given."""
    duplicates: int
    """Batches that were already stored (or given twice in this call): nothing written."""
    refused: dict[str, list[str]] = field(default_factory=dict)
    """Device -> metrics whose samples were left out (the device is at its series limit)."""
    refused_samples: int = 0

    @property
    def samples(self) -> int:
        return sum(len(batch.samples) for batch in self.stored)


def _insert_for(engine: Engine, table: sa.Table) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT (PostgreSQL and SQLite only)."""
    dialect = engine.dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"telemetry needs SQLite or PostgreSQL, not {dialect}")


class SeriesIds:
    """``(device_id, metric)`` -> series id, created on first sight, remembered afterwards.

    The memory is bounded: past ``max_entries`` it starts over (ids never change, so a
    forgotten one is simply read again). A device gets at most ``max_per_device`` series.
    """

    def __init__(
        self,
        engine: Engine,
        max_entries: int = DEFAULT_SERIES_CACHE,
        max_per_device: int = DEFAULT_MAX_SERIES_PER_DEVICE,
    ) -> None:
        if max_per_device < 1:
            raise ValueError(f"max_per_device must be at least 1, got {max_per_device}")
        self._engine = engine
        self._max = max_entries
        self._max_per_device = max_per_device
        self._known: dict[SeriesKey, int] = {}
        self._refused: dict[SeriesKey, float] = {}  # -> until when (monotonic)
        self._create = _insert_for(engine, series).on_conflict_do_nothing()

    def __len__(self) -> int:
        return len(self._known)

    def resolve(self, keys: Iterable[SeriesKey]) -> dict[SeriesKey, int]:
        """The ids of ``keys``: missing series are created and committed; a key left out is
        refused (its device is at its series limit)."""
        known = self._known
        wanted = set(keys)
        missing = {key for key in wanted if key not in known}
        if missing and self._refused:
            now = time.monotonic()
            missing = {key for key in missing if self._refused.get(key, 0.0) <= now}
        if missing:
            if len(known) + len(missing) > self._max:
                known.clear()  # start over, but keep what this call needs
                missing = {key for key in wanted if self._refused.get(key, 0.0) <= time.monotonic()}
            known.update(self._load(missing))
        return known

    def _select(self, conn: Connection, keys: list[SeriesKey]) -> dict[SeriesKey, int]:
        found: dict[SeriesKey, int] = {}
        for start in range(0, len(keys), _LOOKUP_CHUNK):
            chunk = keys[start : start + _LOOKUP_CHUNK]
            rows = conn.execute(
                sa.select(series.c.device_id, series.c.metric, series.c.id).where(
                    sa.tuple_(series.c.device_id, series.c.metric).in_(chunk)
                )
            )
            found.update({(d, m): int(i) for d, m, i in rows})
        return found

    def _within_limit(self, conn: Connection, new: list[SeriesKey]) -> list[SeriesKey]:
        """The keys of ``new`` their devices may still create; the rest are remembered as
        refused for a while."""
        devices = sorted({device for device, _ in new})
        counted = conn.execute(
            sa.select(series.c.device_id, sa.func.count())
            .where(series.c.device_id.in_(devices))
            .group_by(series.c.device_id)
        )
        counts = {str(device): int(n) for device, n in counted}
        allowed: list[SeriesKey] = []
        until = time.monotonic() + _REFUSED_FOR
        for key in new:  # sorted: the same metrics win on every replica
            if counts.get(key[0], 0) < self._max_per_device:
                counts[key[0]] = counts.get(key[0], 0) + 1
                allowed.append(key)
            else:
                if len(self._refused) >= _REFUSED_MAX:
                    self._refused.clear()
                self._refused[key] = until
        return allowed

    def _load(self, missing: set[SeriesKey]) -> dict[SeriesKey, int]:
        wanted = sorted(missing)  # one order for every replica: no deadlock between them
        with self._engine.begin() as conn:
            found = self._select(conn, wanted)
            new = self._within_limit(conn, [key for key in wanted if key not in found])
            if new:
                conn.execute(self._create, [{"device_id": d, "metric": m} for d, m in new])
                found.update(self._select(conn, new))
        return found


class TelemetryStore:
    """Writes batches through one engine (SQLite or PostgreSQL with psycopg 3)."""

    def __init__(
        self,
        engine: Engine,
        series_cache: int = DEFAULT_SERIES_CACHE,
        max_series_per_device: int = DEFAULT_MAX_SERIES_PER_DEVICE,
    ) -> None:
        self.engine = engine
        self.series = SeriesIds(engine, series_cache, max_series_per_device)
        self._postgres = engine.dialect.name == "postgresql"
        self._insert_keys = (
            _insert_for(engine, batches)
            .on_conflict_do_nothing()
            .returning(batches.c.device_id, batches.c.seq)
        )

    def write(self, incoming: Iterable[IncomingBatch], received_at: float) -> WriteResult:
        """Store the batches not stored yet, in one transaction; raises SQLAlchemyError."""
        unique: dict[tuple[str, int], IncomingBatch] = {}
        given = 0
        for batch in incoming:
            given += 1
            unique.setdefault((batch.device_id, batch.seq), batch)
        if not unique:
            return WriteResult([], given)
        wanted = {
            (batch.device_id, sample[0]) for batch in unique.values() for sample in batch.samples
        }
        ids = self.series.resolve(wanted)
        refused = wanted.difference(ids)
        refused_samples = 0
        if refused:
            refused_samples = self._leave_out(unique, refused)
        with self.engine.begin() as conn:
            new_keys = self._insert_batch_keys(conn, unique.values(), received_at)
            stored = [batch for key, batch in unique.items() if key in new_keys]
            if stored:
                self._insert_samples(conn, stored, ids)
        by_device: dict[str, list[str]] = {}
        for device_id, metric in sorted(refused):
            by_device.setdefault(device_id, []).append(metric)
        return WriteResult(stored, given - len(stored), by_device, refused_samples)

    @staticmethod
    def _leave_out(unique: dict[tuple[str, int], IncomingBatch], refused: set[SeriesKey]) -> int:
        """Drop the samples of refused series from the batches; how many were dropped."""
        dropped = 0
        for key, batch in unique.items():
            kept = [s for s in batch.samples if (batch.device_id, s[0]) not in refused]
            if len(kept) != len(batch.samples):
                dropped += len(batch.samples) - len(kept)
                unique[key] = replace(batch, samples=kept)
        return dropped

    def _insert_batch_keys(
        self, conn: Connection, items: Iterable[IncomingBatch], received_at: float
    ) -> set[tuple[str, int]]:
        if self._postgres:
            listed = list(items)
            params = {
                "device_ids": [batch.device_id for batch in listed],
                "seqs": [batch.seq for batch in listed],
                "received": [received_at] * len(listed),
                "counts": [len(batch.samples) for batch in listed],
            }
            return {(d, s) for d, s in conn.execute(_INSERT_KEYS_PG, params)}
        rows = [
            {
                "device_id": batch.device_id,
                "seq": batch.seq,
                "received_at": received_at,
                "samples": len(batch.samples),
            }
            for batch in items
        ]
        result = conn.execute(self._insert_keys, rows)
        return {(device_id, seq) for device_id, seq in result}

    def _insert_samples(
        self, conn: Connection, stored: list[IncomingBatch], ids: dict[SeriesKey, int]
    ) -> None:
        if self._postgres:
            driver = conn.connection.driver_connection
            assert driver is not None
            with driver.cursor() as cursor, cursor.copy(_COPY_SAMPLES) as copy:
                copy.write(_binary_copy(stored, ids))
        else:
            rows = [
                (ids[device_id, metric], ts, value)
                for batch in stored
                for device_id in (batch.device_id,)
                for metric, ts, value in batch.samples
            ]
            conn.exec_driver_sql(_INSERT_SAMPLES, rows)


def _binary_copy(stored: list[IncomingBatch], ids: dict[SeriesKey, int]) -> bytes:
    """The samples of `stored` as one complete binary COPY stream for telemetry_samples."""
    pack = _COPY_ROW.pack
    rows = [
        pack(3, 4, ids[device_id, metric], 8, ts, 8, value)
        for batch in stored
        for device_id in (batch.device_id,)
        for metric, ts, value in batch.samples
    ]
    return b"".join((_COPY_HEADER, *rows, _COPY_TRAILER))


def count_samples(engine: Engine, device_id: str | None = None) -> int:
    """How many samples are stored, raw and compacted (of one device); for tests, benches and
    diagnostics."""
    total = 0
    with engine.connect() as conn:
        raw = raw_source(conn)
        for table, counted in ((raw, sa.func.count()), (chunks, sa.func.sum(chunks.c.count))):
            query = sa.select(counted).select_from(table)
            if device_id is not None:
                query = query.join(series, series.c.id == table.c.series_id).where(
                    series.c.device_id == device_id
                )
            total += int(conn.execute(query).scalar() or 0)
    return total
