"""The gateway's telemetry ingest against a real Mosquitto (TLS, dynamic security, persistence)
and real databases (each test runs on SQLite and on PostgreSQL).

The broker is this module's own `MosquittoSupervisor` (the one `gateway run` starts), so its
restarts and the ingests' persistent sessions stay out of other tests. The device side is a real
`Outbox` + `TelemetrySender` on a paho client (`DeviceLink`) or a plain MQTT client publishing
hand-made payloads (`MqttProbe`), with credentials the broker's ACL ties to the device's topics.
"""

from __future__ import annotations

import json
import logging
import math
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
from gateway.registry.models import Device, DeviceState
from gateway.settings import GatewaySettings
from gateway.telemetry import queries
from gateway.telemetry.models import batches
from gateway.telemetry.retention import Retention
from gateway.telemetry.store import IncomingBatch, TelemetryStore
from provisioning.telemetry import Sample, encode_batch
from tests.support.mosquitto import MqttProbe, enroll_device, running_broker
from tests.support.telemetry import (
    CuttableLink,
    DeviceLink,
    numbered,
    register,
    running_ingest,
    session_present,
    stored_values,
    wait_values,
)
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def tele_broker() -> Iterator[MosquittoSupervisor]:
    with running_broker() as supervisor:
        yield supervisor


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(GatewaySettings(db_url=db_url).database_url)
    migrate(engine)
    yield engine
    engine.dispose()


def _device_id() -> str:
    return f"dev-{uuid.uuid4().hex[:10]}"


def _topic(device_id: str) -> str:
    return f"fleet/{device_id}/telemetry"


def test_stream_is_stored_once_and_redeliveries_are_dropped(
    engine: Engine, tele_broker: MosquittoSupervisor
) -> None:
    device = _device_id()
    endpoint = register(engine, tele_broker, device)
    with running_ingest(tele_broker, engine) as (ingest, log), MqttProbe(endpoint, device) as pub:
        assert not pub.connect().is_failure
        for seq in range(1, 41):  # 40 batches of 5 numbered samples: values 0..199
            pub.client.publish(_topic(device), numbered(seq, (seq - 1) * 5, 5), qos=1)
        for seq in range(1, 11):  # the same ten batches again, as a redelivery would bring them
            pub.publish(_topic(device), numbered(seq, (seq - 1) * 5, 5))
        wait_for(lambda: log.duplicates == 10, 15, what="the ten redeliveries")
        wait_for(lambda: ingest.outstanding() == 0, 10, what="every message acknowledged")
    assert stored_values(engine, device) == [float(v) for v in range(200)]
    assert sorted(log.seqs(device)) == list(range(1, 41))
    metrics = ingest.metrics
    assert metrics.value("batches_stored_total") == 40
    assert metrics.value("samples_stored_total") == 200
    assert metrics.value("batches_duplicate_total") == 10


def test_refused_messages_are_counted_logged_once_and_the_stream_goes_on(
    engine: Engine, tele_broker: MosquittoSupervisor, caplog: pytest.LogCaptureFixture
) -> None:
    device, other, stranger = _device_id(), _device_id(), _device_id()
    endpoint = register(engine, tele_broker, device)
    register(engine, tele_broker, other)
    stranger_endpoint = enroll_device(tele_broker, stranger)  # broker credential, no registry row
    now = time.time()
    sample = {"m": "n", "t": now, "v": 1.0}
    bad = {
        "malformed_json": b'{"v": 1, "seq": 3, "samples": [',
        "schema": json.dumps({"v": 1, "samples": [sample]}).encode(),  # no seq
        "unsupported_version": json.dumps({"v": 2, "seq": 4, "samples": [sample]}).encode(),
        "oversized": numbered(5, 1000, 300),  # > max_bytes below
        "non_numeric": json.dumps(
            {"v": 1, "seq": 6, "samples": [{"m": "n", "t": now, "v": "hot"}]}
        ).encode(),
        "future_timestamp": numbered(7, 2000, 1, ts=now + 3600),
        "device_mismatch": encode_batch(8, [Sample("n", now, 3000.0)], device=other),
    }
    caplog.set_level(logging.WARNING, logger="gateway.telemetry.ingest")
    with (
        running_ingest(tele_broker, engine, max_bytes=4096) as (ingest, _log),
        MqttProbe(endpoint, device) as pub,
        MqttProbe(stranger_endpoint, stranger) as intruder,
    ):
        assert not pub.connect().is_failure
        assert not intruder.connect().is_failure
        pub.publish(_topic(device), numbered(1, 0, 5))
        for payload in bad.values():  # each bad message twice: counted twice, logged once
            pub.publish(_topic(device), payload)
            pub.publish(_topic(device), payload)
        intruder.publish(_topic(stranger), numbered(1, 500, 5))
        pub.publish(_topic(device), numbered(2, 5, 5))
        wait_values(engine, device, 10)
        sent = 2 + 2 * len(bad) + 1
        wait_for(
            lambda: ingest.metrics.value("messages_received_total") == sent, 10, what="all handled"
        )
        wait_for(lambda: ingest.outstanding() == 0, 10, what="refused ones acknowledged too")

    assert stored_values(engine, device) == [float(v) for v in range(10)]
    assert stored_values(engine, stranger) == []
    for reason in bad:
        assert ingest.metrics.refused_count(reason) == 2, reason
    assert ingest.metrics.refused_count("unknown_device") == 1
    logged = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    for reason in bad:
        mine = [m for m in logged if f"({reason})" in m]
        assert len(mine) == 1, (reason, logged)
        assert device in mine[0]
    assert any(stranger in m and "(unknown_device)" in m for m in logged)


def test_revoked_device_is_refused_after_the_refresh(
    engine: Engine, tele_broker: MosquittoSupervisor
) -> None:
    device = _device_id()
    endpoint = register(engine, tele_broker, device)
    with (
        running_ingest(tele_broker, engine, device_refresh=0) as (ingest, _log),
        MqttProbe(endpoint, device) as pub,
    ):
        assert not pub.connect().is_failure
        pub.publish(_topic(device), numbered(1, 0, 3))
        wait_values(engine, device, 3)
        with engine.begin() as conn:  # revoked in the registry; the broker still lets it in
            conn.execute(
                sa.update(Device.__table__)  # type: ignore[attr-defined]
                .where(Device.__table__.c.id == device)  # type: ignore[attr-defined]
                .values(state=DeviceState.revoked.value)
            )
        pub.publish(_topic(device), numbered(2, 3, 3))
        wait_for(lambda: ingest.metrics.refused_count("unknown_device") == 1, 10)
    assert stored_values(engine, device) == [0.0, 1.0, 2.0]


def _rename(engine: Engine, old: str, new: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(f"ALTER TABLE {old} RENAME TO {new}"))


def test_database_error_acknowledges_nothing_and_the_broker_keeps_the_messages(
    engine: Engine, tele_broker: MosquittoSupervisor
) -> None:
    """A missing table stands in for a database that refuses writes (a real error from the
    real database, no mock): nothing is acknowledged while it lasts; the writer retries; and an
    ingest stopped during the outage gets the messages again from its broker session."""
    device = _device_id()
    endpoint = register(engine, tele_broker, device)
    client_id = f"test-ingest-{uuid.uuid4().hex[:8]}"
    with MqttProbe(endpoint, device) as pub:
        assert not pub.connect().is_failure
        _rename(engine, "telemetry_batches", "telemetry_batches_away")
        with running_ingest(tele_broker, engine, client_id=client_id, forget=False) as (
            ingest,
            _log,
        ):
            for seq in range(1, 21):
                pub.publish(_topic(device), numbered(seq, (seq - 1) * 2, 2))
            wait_for(lambda: ingest.metrics.value("write_errors_total") >= 1, 10)
            wait_for(lambda: ingest.outstanding() == 20, 10, what="20 unacknowledged")
            _rename(engine, "telemetry_batches_away", "telemetry_batches")
            wait_values(engine, device, 40, timeout=15)  # the retry went through
            wait_for(lambda: ingest.outstanding() == 0, 10)
            # Second outage: this time the ingest is stopped before the database is back.
            _rename(engine, "telemetry_batches", "telemetry_batches_away")
            errors = ingest.metrics.value("write_errors_total")
            for seq in range(21, 31):
                pub.publish(_topic(device), numbered(seq, (seq - 1) * 2, 2))
            wait_for(lambda: ingest.metrics.value("write_errors_total") > errors, 10)
            assert ingest.outstanding() == 10
        _rename(engine, "telemetry_batches_away", "telemetry_batches")
        assert len(stored_values(engine, device)) == 40
        # Same client id, same session: the broker hands over what was never acknowledged.
        with running_ingest(tele_broker, engine, client_id=client_id) as (_again, log):
            values = wait_values(engine, device, 60, timeout=15)
            wait_for(lambda: len(log.seqs(device)) == 10, 10)
    assert values == [float(v) for v in range(60)]
    assert sorted(log.seqs(device)) == list(range(21, 31))


def test_two_ingests_share_the_stream(engine: Engine, tele_broker: MosquittoSupervisor) -> None:
    device = _device_id()
    endpoint = register(engine, tele_broker, device)
    with (
        running_ingest(tele_broker, engine) as (_a, log_a),
        running_ingest(tele_broker, engine) as (_b, log_b),
        MqttProbe(endpoint, device) as pub,
    ):
        assert not pub.connect().is_failure
        for seq in range(1, 101):
            pub.client.publish(_topic(device), numbered(seq, seq - 1, 1), qos=1)
        wait_values(engine, device, 100)
    got_a, got_b = set(log_a.seqs(device)), set(log_b.seqs(device))
    assert got_a and got_b, "each replica ingests a share"
    assert got_a | got_b == set(range(1, 101))
    assert not got_a & got_b
    assert stored_values(engine, device) == [float(v) for v in range(100)]


def test_a_replica_that_leaves_hands_its_share_to_the_others(
    engine: Engine, tele_broker: MosquittoSupervisor
) -> None:
    """Stopped plainly, a replica keeps its session and the broker keeps dealing it a share;
    stopped with ``leave`` it is out of the group: the others get everything."""
    device = _device_id()
    endpoint = register(engine, tele_broker, device)
    leaving = f"test-ingest-{uuid.uuid4().hex[:8]}"
    with running_ingest(tele_broker, engine) as (_stays, log):
        with running_ingest(tele_broker, engine, client_id=leaving, forget=False, leave=True):
            pass
        assert not session_present(tele_broker.endpoint, leaving)
        with MqttProbe(endpoint, device) as pub:
            assert not pub.connect().is_failure
            for seq in range(1, 41):
                pub.client.publish(_topic(device), numbered(seq, seq - 1, 1), qos=1)
            wait_values(engine, device, 40)
    assert sorted(log.seqs(device)) == list(range(1, 41))


class _Feeder:
    """Adds numbered samples to a device's outbox at a steady pace until stopped."""

    def __init__(self, link: DeviceLink, chunk: int = 10, pace: float = 0.005) -> None:
        self.link, self.chunk, self.pace = link, chunk, pace
        self.added = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.link.add(self.added, self.chunk)
            self.added += self.chunk
            self._stop.wait(self.pace)

    def __enter__(self) -> _Feeder:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_broker_restart_mid_stream_loses_and_duplicates_nothing(
    engine: Engine, tele_broker: MosquittoSupervisor, tmp_path: Path
) -> None:
    device = _device_id()
    link = DeviceLink(register(engine, tele_broker, device), device, tmp_path / "ob.db", 10)
    link.start()
    try:
        with running_ingest(tele_broker, engine) as (ingest, _log):
            with _Feeder(link) as feeder:
                wait_values(engine, device, 300)
                tele_broker.stop()  # SIGTERM: Mosquitto saves its sessions and queues
                tele_broker.start()
                before = len(stored_values(engine, device))
                wait_values(engine, device, before + 300, timeout=30)  # flowing again
            total = feeder.added
            try:
                values = wait_values(engine, device, total, timeout=30)
            except TimeoutError:
                got = {int(v) for v in stored_values(engine, device)}
                missing = sorted(set(range(total)) - got)
                raise AssertionError(
                    f"missing {len(missing)}: {missing[:10]}..{missing[-5:]}; outbox "
                    f"{link.outbox.stats()}; sender {link.sender.stats()}; ingest outstanding "
                    f"{ingest.outstanding()}"
                ) from None
            wait_for(lambda: len(link.outbox) == 0, 15, what="the outbox empty")
            wait_for(lambda: ingest.outstanding() == 0, 15)
            values = stored_values(engine, device)
    finally:
        link.close()
    assert values == [float(v) for v in range(total)]  # all there, none twice


def test_outbox_drains_in_order_after_the_network_was_gone(
    engine: Engine, tele_broker: MosquittoSupervisor, tmp_path: Path
) -> None:
    device = _device_id()
    relay = CuttableLink(tele_broker.port)  # the machine's only way to the broker
    endpoint = relay.endpoint(register(engine, tele_broker, device))
    link = DeviceLink(endpoint, device, tmp_path / "ob.db", 20)
    link.start()
    try:
        with running_ingest(tele_broker, engine) as (_ingest, log):
            link.add(0, 100)
            wait_values(engine, device, 100)
            relay.cut()
            wait_for(lambda: not link.connected.is_set(), 10, what="the device offline")
            for first in range(100, 600, 50):  # the machine keeps measuring meanwhile
                link.add(first, 50)
            assert len(link.outbox) == 500
            assert len(stored_values(engine, device)) == 100
            relay.restore()
            values = wait_values(engine, device, 600, timeout=30)
            wait_for(lambda: len(link.outbox) == 0, 15, what="the outbox empty")
    finally:
        link.close()
        relay.close()
    assert values == [float(v) for v in range(600)]
    seqs = log.seqs(device)
    assert len(seqs) == len(set(seqs)) == 30  # 600 samples / 20 per batch, each stored once
    assert seqs == sorted(seqs), "the outbox drained out of order"


def test_batches_nobody_subscribed_to_stay_in_the_outbox_until_the_gateway_is_there(
    engine: Engine, tele_broker: MosquittoSupervisor, tmp_path: Path
) -> None:
    """With no ingest subscribed (the gateway not started yet, or Mosquitto 2.0 just restarted:
    it does not restore shared subscriptions), the broker answers "no matching subscribers"
    (0x10) and drops the message; the agent must keep such batches and send them again."""
    device = _device_id()
    link = DeviceLink(register(engine, tele_broker, device), device, tmp_path / "ob.db", 10)
    link.start()
    try:
        link.add(0, 50)
        wait_for(lambda: link.sender.stats().refused >= 1, 10, what="a 0x10 PUBACK")
        assert len(link.outbox) == 50
        with running_ingest(tele_broker, engine):
            values = wait_values(engine, device, 50, timeout=20)
            wait_for(lambda: len(link.outbox) == 0, 10, what="the outbox empty")
    finally:
        link.close()
    assert values == [float(v) for v in range(50)]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # about the broker, not the DB
def test_a_backlog_beyond_mosquittos_old_queue_limit_waits_in_the_broker(
    engine: Engine, tele_broker: MosquittoSupervisor
) -> None:
    """A replica that is away (or behind) has its share queued in the broker. 12,000 messages
    with 100 in flight leaves 11,900 queued: past the 10,000 the broker was configured with
    before, which dropped the rest even though every device had its PUBACK."""
    device = _device_id()
    endpoint = register(engine, tele_broker, device)
    client_id = f"test-ingest-{uuid.uuid4().hex[:8]}"
    with running_ingest(tele_broker, engine, client_id=client_id, forget=False):
        pass  # subscribed with a persistent session, then gone
    total = 12_000
    with MqttProbe(endpoint, device) as pub:
        pub.client.max_inflight_messages_set(500)
        assert not pub.connect().is_failure
        infos = [
            pub.client.publish(_topic(device), numbered(seq, seq - 1, 1), qos=1)
            for seq in range(1, total + 1)
        ]
        wait_for(lambda: all(i.is_published() for i in infos), 60, what="every PUBACK")
    with running_ingest(tele_broker, engine, client_id=client_id, receive_maximum=100):
        values = wait_values(engine, device, total, timeout=60)
    assert values == [float(v) for v in range(total)]


def test_series_ids_survive_a_full_cache(engine: Engine) -> None:
    """The series cache starts over when full; a write still finds every id it needs."""
    device = _device_id()
    store = TelemetryStore(engine, series_cache=3)
    now = time.time()
    for seq in range(1, 6):  # each batch: 2 metrics, one new each time -> the cache overflows
        names = [f"m{seq}", f"m{seq + 1}"]
        store.write([IncomingBatch(device, seq, [Sample(n, now, float(seq)) for n in names])], now)
    assert len(store.series) <= 3
    with engine.connect() as conn:
        latest = {x.metric: x.value for x in queries.latest(conn, device)}
    assert latest == {"m1": 1.0, "m2": 2.0, "m3": 3.0, "m4": 4.0, "m5": 5.0, "m6": 5.0}


def test_values_and_times_are_stored_bit_for_bit(engine: Engine) -> None:
    """Extreme floats survive the write (on PostgreSQL: the hand-built binary COPY stream)."""
    device = _device_id()
    values = [0.0, -0.0, -3.5, 1e-300, 5e-324, 1.7976931348623157e308, 2.0**53 + 2, 0.1 + 0.2]
    times = [1.0, 1_700_000_000.123456, 4_102_444_800.000001]
    samples = [Sample(f"m{i}", times[i % 3], v) for i, v in enumerate(values)]
    result = TelemetryStore(engine).write([IncomingBatch(device, 1, samples)], time.time())
    assert result.samples == len(samples)
    with engine.connect() as conn:
        stored = {x.metric: (x.ts, x.value) for x in queries.latest(conn, device)}
    assert stored == {m: (t, v) for m, t, v in samples}


def test_retention_deletes_old_raw_samples_and_keys(engine: Engine) -> None:
    """Raw samples the compaction never reached (here: no compaction at all) and batch keys
    go once older than the age; keys in chunks, each chunk its own transaction."""
    device = _device_id()
    store = TelemetryStore(engine)
    now = time.time()
    old = [IncomingBatch(device, s, [Sample("n", now - 7200 + s, float(s))]) for s in range(1, 31)]
    new = [IncomingBatch(device, s, [Sample("n", now - 60 + s, float(s))]) for s in range(31, 36)]
    store.write(old, received_at=now - 7200)
    store.write(new, received_at=now)
    # Retention drops whole windows: at `later` the cutoff is the first window boundary after
    # the old samples, well before the new ones.
    later = (math.floor((now - 7170) / 3600) + 2) * 3600
    result = Retention(engine, max_age=3600, chunk=7, pause=0).run_once(later)
    assert result.batches == 30
    assert stored_values(engine, device) == [float(s) for s in range(31, 36)]
    with engine.connect() as conn:
        keys = conn.execute(sa.select(batches.c.seq).where(batches.c.device_id == device))
        assert sorted(keys.scalars()) == list(range(31, 36))
        latest = queries.latest(conn, device)
    assert [(x.metric, x.value) for x in latest] == [("n", 35.0)]
    again = Retention(engine, max_age=3600, chunk=7).run_once(later)
    assert (again.raw_samples, again.batches) == (0, 0)
