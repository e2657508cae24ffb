"""Sign, record and publish commands: every command is a row in ``commands`` before it is sent.

The row is the record of what a machine must receive; MQTT is the fast path. Replies update it
(`gateway.commands.replies`), whichever replica receives them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import NamedTuple

import sqlalchemy as sa
from sqlmodel import Session, col, select

from gateway.commands.models import CommandRecord
from gateway.commands.publisher import CommandPublisher
from gateway.db import retry_deadlocks, utcnow
from gateway.errors import Unavailable
from gateway.identity import GatewayIdentity
from provisioning.commands import CommandArgs
from provisioning.jwt_rules import sign_command
from provisioning.states import CommandKind, CommandState


def issue(
    session: Session,
    *,
    identity: GatewayIdentity,
    publisher: CommandPublisher,
    device_id: str,
    kind: CommandKind,
    args: CommandArgs,
    lifetime: int,
    actor: str,
    ref: str | None = None,
) -> CommandRecord:
    """Sign, record and publish one command (see `issue_many`); raises `Unavailable` if the
    broker is not connected or did not confirm it."""
    [issued] = issue_many(
        session,
        identity=identity,
        publisher=publisher,
        device_ids=[device_id],
        kind=kind,
        args=args,
        lifetime=lifetime,
        actor=actor,
        ref=ref,
    )
    if not issued.confirmed:
        raise Unavailable("broker_unavailable", "the broker did not acknowledge the command")
    record = session.get(CommandRecord, issued.command_id)
    assert record is not None
    return record


class Issued(NamedTuple):
    device_id: str
    command_id: str
    confirmed: bool
    """The broker acknowledged it (PUBACK) within the publisher's timeout."""


def issue_many(
    session: Session,
    *,
    identity: GatewayIdentity,
    publisher: CommandPublisher,
    device_ids: Sequence[str],
    kind: CommandKind,
    args: CommandArgs,
    lifetime: int,
    actor: str,
    ref: str | None = None,
) -> list[Issued]:
    """Sign, record and publish the same command to several devices, each its own signed token.

    The rows are committed before anything is published, so a reply can never arrive for a
    command the database does not know; then all are published at once and their PUBACKs
    awaited together (a rollout's wave costs two commits and one broker round trip, not that
    many per device). Returns, per device, its command id and whether the broker confirmed it;
    confirmed commands are marked `sent`, the others stay `queued` (their reply or expiry
    decides). Raises `Unavailable` when the broker is not connected: the rows stay `queued`,
    nothing was sent.
    """
    now = utcnow()
    payload = args.model_dump(mode="json")
    records: list[CommandRecord] = []
    tokens: list[tuple[str, str]] = []
    for device_id in device_ids:
        command_id, token = sign_command(
            identity.private_key,
            gateway_id=identity.gateway_id,
            device_id=device_id,
            kind=kind,
            args=payload,
            lifetime=lifetime,
        )
        records.append(
            CommandRecord(
                id=command_id,
                device_id=device_id,
                kind=kind,
                args=dict(payload),
                state=CommandState.queued,
                created_at=now,
                updated_at=now,
                expires_at=now + timedelta(seconds=lifetime),
                actor=actor,
                ref=ref,
            )
        )
        tokens.append((device_id, token))
    ids = [(record.device_id, record.id) for record in records]  # before the commit expires them
    session.add_all(records)
    session.commit()
    confirmed = publisher.publish_many(tokens)
    sent = [command_id for (_d, command_id), ok in zip(ids, confirmed, strict=True) if ok]
    if sent:  # not where a reply came first and moved it on already
        table: sa.Table = CommandRecord.__table__  # type: ignore[attr-defined]

        def mark_sent() -> None:
            session.execute(
                sa.update(table)
                .where(table.c.id.in_(sent), table.c.state == CommandState.queued)
                .values(state=CommandState.sent, updated_at=utcnow())
            )
            session.commit()

        retry_deadlocks(session, mark_sent)
    return [Issued(d, c, ok) for (d, c), ok in zip(ids, confirmed, strict=True)]


def pending_for(session: Session, ref: str) -> list[CommandRecord]:
    query = select(CommandRecord).where(CommandRecord.ref == ref)
    return list(session.exec(query.order_by(col(CommandRecord.created_at))))
