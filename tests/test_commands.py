"""Storing replies to commands: identity from the topic, results final, hooks run once; the
reply listener stores what arrives together in one transaction, and loses nothing to a bad reply
or a database outage (real Mosquitto, SQLite and PostgreSQL)."""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlmodel import Session, col, select

from gateway.broker.mosquitto import MosquittoSupervisor
from gateway.commands.models import CommandRecord
from gateway.commands.replies import ReplyHooks, ReplyListener, apply_reply, superseding
from gateway.db import retry_deadlocks, utcnow
from gateway.runtime import GatewayRuntime
from provisioning.wire import Reply
from tests.support.mosquitto import MqttProbe, enroll_device
from tests.support.waiting import wait_for


def _record(
    session: Session, device_id: str = "dev-aaa", command_id: str = "c" * 32, kind: str = "deploy"
) -> CommandRecord:
    now = utcnow()
    record = CommandRecord(
        id=command_id,
        device_id=device_id,
        kind=kind,
        args={},
        state="sent",
        created_at=now,
        updated_at=now,
        expires_at=now + timedelta(minutes=5),
        actor="test",
    )
    session.add(record)
    session.commit()
    return record


def test_hooks_run_once_and_the_result_is_final(runtime: GatewayRuntime) -> None:
    calls: list[str] = []
    hooks = ReplyHooks()
    hooks.register("deploy", lambda _s, _r, reply: calls.append(reply.state))
    with Session(runtime.engine, expire_on_commit=False) as session:
        record = _record(session)
        apply_reply(session, "dev-aaa", Reply(command_id=record.id, state="applying"), hooks)
        apply_reply(session, "dev-aaa", Reply(command_id=record.id, state="succeeded"), hooks)
        # The agent got the command twice and reports the stored result again; then a late
        # progress message arrives. Neither changes anything.
        apply_reply(session, "dev-aaa", Reply(command_id=record.id, state="succeeded"), hooks)
        apply_reply(session, "dev-aaa", Reply(command_id=record.id, state="applying"), hooks)
        session.refresh(record)
        assert record.state == "succeeded"
    assert calls == ["applying", "succeeded"]


def test_a_reply_from_another_device_is_ignored(runtime: GatewayRuntime) -> None:
    hooks = ReplyHooks()
    with Session(runtime.engine, expire_on_commit=False) as session:
        record = _record(session)
        ignored = apply_reply(
            session, "dev-bbb", Reply(command_id=record.id, state="succeeded"), hooks
        )
        assert ignored is None
        session.refresh(record)
        assert record.state == "sent"


# ---- the reply listener, through a real broker ---------------------------------------------

KIND = "test.probe"


@contextmanager
def _listening(runtime: GatewayRuntime, broker: MosquittoSupervisor) -> Iterator[ReplyListener]:
    listener = ReplyListener(broker.endpoint, runtime.engine, runtime.topics, runtime.hooks)
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()


@contextmanager
def _device(broker: MosquittoSupervisor) -> Iterator[tuple[str, MqttProbe]]:
    device_id = f"dev-{uuid.uuid4().hex[:10]}"
    with MqttProbe(enroll_device(broker, device_id), device_id) as probe:
        assert not probe.connect().is_failure
        yield device_id, probe


def _commands(runtime: GatewayRuntime, device_id: str, count: int) -> list[str]:
    ids = [uuid.uuid4().hex for _ in range(count)]
    with Session(runtime.engine) as session:
        for command_id in ids:
            _record(session, device_id, command_id, KIND)
    return ids


def _states(runtime: GatewayRuntime, ids: list[str]) -> dict[str, str]:
    with Session(runtime.engine) as session:
        rows = session.exec(select(CommandRecord).where(CommandRecord.kind == KIND)).all()
        return {r.id: r.state for r in rows if r.id in ids}


def test_replies_that_arrive_together_are_stored_in_one_transaction_in_order(
    runtime: GatewayRuntime, broker: MosquittoSupervisor
) -> None:
    seen: list[tuple[int, str, str]] = []  # (transaction, command, state) as the hook saw them
    first_held = threading.Event()
    release = threading.Event()
    numbers = itertools.count()

    def hook(session: Session, record: CommandRecord, reply: Reply) -> None:
        # A number per session (not id(): a collected session's address may be reused).
        transaction = session.info.setdefault("test-transaction", next(numbers))
        seen.append((transaction, record.id, reply.state))
        if len(seen) == 1:  # hold the writer until everything else is queued behind it
            first_held.set()
            assert release.wait(10)

    runtime.hooks.register(KIND, hook)
    with _device(broker) as (device_id, probe), _listening(runtime, broker) as listener:
        ids = _commands(runtime, device_id, 40)
        topic = f"fleet/{device_id}/reply"
        probe.publish(topic, Reply(command_id=ids[0], state="succeeded").model_dump_json())
        assert first_held.wait(10)
        for command_id in ids[1:]:
            for state in ("downloading", "applying", "succeeded"):
                reply = Reply(command_id=command_id, state=state).model_dump_json()
                probe.client.publish(topic, reply, qos=1)  # no wait for each ack
        wait_for(lambda: listener.backlog() == 39 * 3, 10, what="all replies queued")
        release.set()
        wait_for(lambda: listener.processed == 1 + 39 * 3, 10, what="all replies stored")
    assert set(_states(runtime, ids).values()) == {"succeeded"}
    transactions = list(dict.fromkeys(txn for txn, _c, _s in seen))
    assert len(transactions) == 2, "the 117 queued replies went in one transaction"
    # Progress that arrived with its command's result is superseded by it: one write each.
    assert [(c, s) for t, c, s in seen if t == transactions[1]] == [
        (command_id, "succeeded") for command_id in ids[1:]
    ]


def test_only_the_reply_that_decides_is_kept_of_those_that_arrived_together() -> None:
    def reply(command_id: str, state: str) -> tuple[str, Reply]:
        return ("dev-a", Reply(command_id=command_id, state=state))

    group = [
        reply("c1", "downloading"),
        reply("c2", "downloading"),
        reply("c1", "applying"),
        reply("c1", "failed"),
        reply("c1", "applying"),  # late progress after the result: ignored anyway
        reply("c2", "applying"),
        reply("c1", "succeeded"),  # a second result: the first one stands
        ("dev-b", Reply(command_id="c2", state="succeeded")),  # another device's topic
    ]
    assert superseding(group) == [group[3], group[5], group[7]]


def test_a_reply_that_cannot_be_stored_does_not_keep_the_others_out(
    runtime: GatewayRuntime, broker: MosquittoSupervisor, caplog: pytest.LogCaptureFixture
) -> None:
    poison: list[str] = []
    release = threading.Event()

    def hook(_session: Session, record: CommandRecord, _reply: Reply) -> None:
        assert release.wait(10)  # the first reply waits, so the rest arrive as one group
        if record.id in poison:
            raise RuntimeError("a bug in a hook")

    runtime.hooks.register(KIND, hook)
    with _device(broker) as (device_id, probe), _listening(runtime, broker) as listener:
        ids = _commands(runtime, device_id, 6)
        poison.append(ids[3])
        topic = f"fleet/{device_id}/reply"
        for command_id in ids:
            probe.publish(topic, Reply(command_id=command_id, state="succeeded").model_dump_json())
        probe.publish(topic, b"{not json")  # malformed: dropped with a warning, nothing else
        wait_for(lambda: listener.backlog() >= 6, 10, what="the replies queued")
        with caplog.at_level(logging.WARNING, logger="gateway.commands"):
            release.set()
            wait_for(lambda: listener.processed == 7, 10, what="every reply handled")
    states = _states(runtime, ids)
    assert states.pop(ids[3]) == "sent"  # its hook failed: its transaction was rolled back
    assert set(states.values()) == {"succeeded"}
    assert f"could not store a reply from {device_id}" in caplog.text
    assert "reply from " in caplog.text and "refused (malformed_json)" in caplog.text


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_replies_wait_out_a_database_outage(
    runtime: GatewayRuntime,
    broker: MosquittoSupervisor,
    db_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A real outage: PostgreSQL refuses connections to the database and drops the open ones.
    The replies that arrive meanwhile are kept and stored when it is back."""
    url = make_url(db_url)
    admin = url.set(database="postgres").render_as_string(hide_password=False)
    admin = admin.replace("postgresql+psycopg://", "postgresql://")

    def allow(on: bool) -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS {str(on).lower()}')
            if not on:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (url.database,),
                )

    with _device(broker) as (device_id, probe), _listening(runtime, broker) as listener:
        ids = _commands(runtime, device_id, 5)
        topic = f"fleet/{device_id}/reply"
        allow(False)
        try:
            for command_id in ids:
                probe.publish(
                    topic, Reply(command_id=command_id, state="succeeded").model_dump_json()
                )
            with caplog.at_level(logging.ERROR, logger="gateway.commands"):
                wait_for(lambda: "retrying in" in caplog.text, 10, what="a failed write")
                wait_for(lambda: caplog.text.count("retrying in") >= 2, 10, what="a retry")
            assert listener.processed == 0  # held, nothing stored and nothing dropped
        finally:
            allow(True)
        wait_for(lambda: listener.processed == 5, 20, what="the replies stored after the outage")
    assert set(_states(runtime, ids).values()) == {"succeeded"}


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_deadlock_victim_is_rolled_back_and_runs_again(runtime: GatewayRuntime) -> None:
    """Two real transactions lock two rows in opposite orders. The one in `retry_deadlocks`
    checks for deadlocks sooner, so PostgreSQL makes it the victim; it runs again and commits."""
    with Session(runtime.engine) as session:
        for name in ("a", "b"):
            _record(session, "dev-aaa", name * 32)
    other_has_b = threading.Event()
    work_has_a = threading.Event()
    attempts: list[int] = []

    def other() -> None:
        with Session(runtime.engine) as session:
            session.execute(sa.text("SET deadlock_timeout = '20s'"))
            _touch(session, "b" * 32, "other")
            other_has_b.set()
            assert work_has_a.wait(10)
            _touch(session, "a" * 32, "other")  # waits for the first attempt: a deadlock
            session.commit()

    def work() -> None:
        attempts.append(1)
        _touch(session, "a" * 32, "work")
        work_has_a.set()
        _touch(session, "b" * 32, "work")
        session.commit()

    thread = threading.Thread(target=other)
    with Session(runtime.engine) as session:
        session.execute(sa.text("SET deadlock_timeout = '500ms'"))
        thread.start()
        assert other_has_b.wait(10)
        retry_deadlocks(session, work)
    thread.join(10)
    assert len(attempts) == 2
    with Session(runtime.engine) as session:
        assert session.exec(
            select(CommandRecord.detail).where(col(CommandRecord.id).in_(["a" * 32, "b" * 32]))
        ).all() == ["work", "work"]


def _touch(session: Session, command_id: str, detail: str) -> None:
    session.execute(
        sa.text("UPDATE commands SET detail = :detail WHERE id = :id"),
        {"detail": detail, "id": command_id},
    )
