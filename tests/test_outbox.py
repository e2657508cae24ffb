"""The agent's disk-backed outbox, on a real SQLite file."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from edge_agent.telemetry.outbox import Outbox, OutboxError, PendingBatch
from provisioning.telemetry import BatchRejected, Sample, parse_batch


def numbered(start: int, count: int, metric: str = "n") -> list[Sample]:
    """Samples whose value is their number, so tests can tell exactly which ones survive."""
    now = time.time()
    return [Sample(metric, now, float(i)) for i in range(start, start + count)]


def values(batch: PendingBatch) -> list[int]:
    return [int(sample.value) for sample in batch.samples]


def drain(outbox: Outbox) -> Iterator[PendingBatch]:
    """Hand out every batch in order without acking, the way a sender with no limit would."""
    cursor = 0
    while (batch := outbox.next_batch(after=cursor)) is not None:
        yield batch
        cursor = batch.seq


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "outbox" / "telemetry.db"


def test_batches_are_ordered_numbered_and_sized(db: Path) -> None:
    with Outbox(db, batch_size=100) as outbox:
        outbox.add(numbered(0, 120))
        outbox.add(numbered(120, 130))
        batches = list(drain(outbox))
        assert [b.seq for b in batches] == [1, 2, 3]
        assert [len(b.samples) for b in batches] == [100, 100, 50]
        assert [v for b in batches for v in values(b)] == list(range(250))
        assert outbox.stats().next_seq == 4
        assert outbox.stats().batches_pending == 3


def test_a_batch_keeps_its_seq_and_samples_until_acked(db: Path) -> None:
    with Outbox(db, batch_size=10) as outbox:
        outbox.add(numbered(0, 25))
        first = outbox.next_batch()
        assert first is not None
        again = outbox.next_batch()  # no cursor: the oldest unacked batch, the same one
        assert again == first
        second = outbox.next_batch(after=first.seq)
        assert second is not None and second.seq == first.seq + 1
        assert outbox.ack(first.seq) is True
        assert outbox.ack(first.seq) is False  # a duplicate PUBACK is harmless
        assert outbox.next_batch() == second
        assert len(outbox) == 15


def test_emptied_outbox_keeps_batching_new_samples(db: Path) -> None:
    """SQLite reuses row ids once a table is empty; new samples must still form new batches."""
    with Outbox(db, batch_size=10) as outbox:
        outbox.add(numbered(0, 20))
        for batch in list(drain(outbox)):
            assert outbox.ack(batch.seq)
        assert len(outbox) == 0
        outbox.add(numbered(20, 5))
        fresh = outbox.next_batch()
        assert fresh is not None and fresh.seq == 3
        assert values(fresh) == list(range(20, 25))


def test_acking_the_newest_batch_first_keeps_later_samples(db: Path) -> None:
    with Outbox(db, batch_size=10) as outbox:
        outbox.add(numbered(0, 30))
        first, second, third = drain(outbox)
        assert outbox.ack(third.seq) and outbox.ack(second.seq)
        outbox.add(numbered(30, 5))
        assert outbox.next_batch() == first
        fresh = outbox.next_batch(after=first.seq)
        assert fresh is not None and fresh.seq == 4
        assert values(fresh) == list(range(30, 35))


def test_payload_is_valid_wire_format(db: Path) -> None:
    with Outbox(db) as outbox:
        outbox.add(numbered(0, 3, metric="line1/temp"))
        batch = outbox.next_batch()
        assert batch is not None
        wire = parse_batch(batch.encode(), max_bytes=65536, max_samples=100, now=time.time())
        assert wire.seq == batch.seq
        assert wire.samples == batch.samples


def test_survives_restart_with_the_same_batches(db: Path) -> None:
    outbox = Outbox(db, batch_size=10)
    outbox.add(numbered(0, 35))
    handed_out = [outbox.next_batch(after=0), outbox.next_batch(after=1)]
    assert outbox.ack(1)
    outbox.close()

    with Outbox(db, batch_size=10) as reopened:
        assert len(reopened) == 25
        assert reopened.stats().queued == 25
        after_restart = list(drain(reopened))
        # batch 2 was handed out before the restart: same seq, same samples
        assert after_restart[0] == handed_out[1]
        # the rest is new batches continuing the sequence, samples in order
        assert [b.seq for b in after_restart] == [2, 3, 4]
        assert [v for b in after_restart for v in values(b)] == list(range(10, 35))


_CRASHING_AGENT = """
import os, signal, sys, time
from pathlib import Path
from edge_agent.telemetry.outbox import Outbox
from provisioning.telemetry import Sample
outbox = Outbox(Path(sys.argv[1]), batch_size=10)
outbox.add([Sample("n", time.time(), float(i)) for i in range(25)])
batch = outbox.next_batch()
print(batch.seq, [int(s.value) for s in batch.samples], flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no atexit: a crash
"""


def test_survives_a_killed_agent_process(db: Path) -> None:
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASHING_AGENT, str(db)], capture_output=True, text=True, timeout=60
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    seq_text, _, values_text = crashed.stdout.partition(" ")
    with Outbox(db, batch_size=10) as reopened:
        assert len(reopened) == 25
        batch = reopened.next_batch()
        assert batch is not None
        assert batch.seq == int(seq_text)
        assert str(values(batch)) == values_text.strip()
        assert reopened.stats().next_seq == batch.seq + 1


def test_bound_drops_the_oldest_and_counts_them(db: Path) -> None:
    with Outbox(db, max_samples=1000, batch_size=100) as outbox:
        outbox.add(numbered(0, 600))
        outbox.add(numbered(600, 900))
        assert len(outbox) == 1000
        stats = outbox.stats()
        assert stats.dropped == 500
        assert [v for b in drain(outbox) for v in values(b)] == list(range(500, 1500))
    with Outbox(db, max_samples=1000, batch_size=100) as reopened:
        assert reopened.stats().dropped == 500  # persisted for the agent's status


def test_dropping_into_a_batch_drops_the_whole_batch(db: Path) -> None:
    with Outbox(db, max_samples=1000, batch_size=100) as outbox:
        outbox.add(numbered(0, 1000))
        first = outbox.next_batch()
        assert first is not None and values(first) == list(range(100))
        outbox.add(numbered(1000, 50))  # 50 too many, but they sit inside batch 1
        assert outbox.stats().dropped == 100
        assert len(outbox) == 950
        assert outbox.ack(first.seq) is False  # it is gone: a late PUBACK changes nothing
        nxt = outbox.next_batch()
        assert nxt is not None
        assert nxt.seq == first.seq + 1
        assert values(nxt) == list(range(100, 200))


def test_one_call_larger_than_the_outbox_keeps_its_newest(db: Path) -> None:
    with Outbox(db, max_samples=100, batch_size=10) as outbox:
        outbox.add(numbered(0, 30))
        outbox.add(numbered(30, 250))
        assert len(outbox) == 100
        assert outbox.stats().dropped == 180
        assert [v for b in drain(outbox) for v in values(b)] == list(range(180, 280))


def test_a_bad_sample_stores_nothing_of_its_call(db: Path) -> None:
    with Outbox(db) as outbox:
        outbox.add(numbered(0, 5))
        bad = [*numbered(5, 3), Sample("temp", time.time(), float("nan"))]
        with pytest.raises(BatchRejected) as info:
            outbox.add(bad)
        assert info.value.reason == "non_numeric"
        with pytest.raises(BatchRejected):
            outbox.add([Sample("no spaces allowed", time.time(), 1.0)])
        with pytest.raises(BatchRejected):
            outbox.add([Sample("temp", time.time() * 1000, 1.0)])  # milliseconds
        assert len(outbox) == 5


def test_add_values_stamps_now(db: Path) -> None:
    with Outbox(db) as outbox:
        before = time.time()
        assert outbox.add_values({"a": 1.0, "b": 2}) == 2
        batch = outbox.next_batch()
        assert batch is not None
        assert [(s.metric, s.value) for s in batch.samples] == [("a", 1.0), ("b", 2.0)]
        assert all(before <= s.ts <= time.time() for s in batch.samples)


def test_stats_report_age_of_the_oldest(db: Path) -> None:
    with Outbox(db) as outbox:
        assert outbox.stats().oldest_age is None
        outbox.add([Sample("temp", time.time() - 120, 1.0)])
        age = outbox.stats().oldest_age
        assert age is not None and 119 < age < 130


def test_one_agent_per_outbox(db: Path) -> None:
    with Outbox(db), pytest.raises(OutboxError, match="another agent"):
        Outbox(db)


def test_closed_outbox_says_so(db: Path) -> None:
    outbox = Outbox(db)
    outbox.close()
    with pytest.raises(OutboxError, match="closed"):
        outbox.add(numbered(0, 1))


def test_bad_configuration_is_refused(db: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        Outbox(db, max_samples=10, batch_size=100)
    with pytest.raises(ValueError, match="max_samples"):
        Outbox(db, max_samples=0)


def test_listeners_hear_about_adds(db: Path) -> None:
    heard: list[int] = []
    with Outbox(db) as outbox:
        outbox.add_listener(lambda: heard.append(len(outbox)))
        outbox.add(numbered(0, 3))
        outbox.add(numbered(3, 2))
        assert heard == [3, 5]


def test_concurrent_adds_and_acks_lose_and_repeat_nothing(db: Path) -> None:
    writers, per_writer, chunk = 4, 5000, 50
    seen: list[int] = []
    errors: list[BaseException] = []
    done_adding = threading.Event()

    with Outbox(db, batch_size=64) as outbox:

        def write(base: int) -> None:
            try:
                for start in range(base, base + per_writer, chunk):
                    outbox.add(numbered(start, chunk))
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)

        def send() -> None:
            try:
                while not (done_adding.is_set() and len(outbox) == 0):
                    batch = outbox.next_batch()
                    if batch is None:
                        time.sleep(0.001)  # a busy drain loop, not a wait for a condition
                        continue
                    seen.extend(values(batch))
                    assert outbox.ack(batch.seq)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(w * per_writer,)) for w in range(writers)]
        sender = threading.Thread(target=send)
        sender.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        done_adding.set()
        sender.join(timeout=60)
        assert not sender.is_alive()
        assert errors == []
        assert sorted(seen) == list(range(writers * per_writer))
        assert len(seen) == len(set(seen))
        stats = outbox.stats()
        assert stats.queued == 0 and stats.batches_pending == 0 and stats.dropped == 0


def test_memory_stays_flat_with_a_million_queued(db: Path) -> None:
    """The samples live on disk: a million of them must not live in Python as well."""
    process = psutil.Process()
    chunk = numbered(0, 1000)
    with Outbox(db) as outbox:
        outbox.add(chunk)
        before = process.memory_info().rss
        while len(outbox) < 1_000_000:
            outbox.add(chunk)
        grown = process.memory_info().rss - before
        assert outbox.stats().queued == 1_000_000
        # a million Sample tuples in a list would be well over 100 MB
        assert grown < 25 * 1024 * 1024, f"RSS grew {grown / 2**20:.1f} MiB"
