"""Storing replies to commands: identity from the topic, results final, hooks run once."""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import Session

from gateway.commands import ReplyHooks, apply_reply
from gateway.db import utcnow
from gateway.models import CommandRecord
from gateway.runtime import GatewayRuntime
from provisioning.wire import Reply


def _record(session: Session, device_id: str = "dev-aaa") -> CommandRecord:
    now = utcnow()
    record = CommandRecord(
        id="c" * 32,
        device_id=device_id,
        kind="deploy",
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
