"""Replies to commands: stored on whichever replica receives them, with each feature's hook.

Every reply updates its command's row (`gateway.commands.models.CommandRecord`), whichever replica
receives it (replies arrive on a shared subscription). Nothing about a command lives only in one
process's memory, so a replica that dies strands nothing.

Features hook in by command kind: `ReplyHooks.register(CommandKind.deploy, fn)` runs
`fn(session, command, reply)` in the same transaction that stores the reply, e.g. to move a
deployment's device state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import paho.mqtt.client as mqtt
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from gateway.commands.models import CommandRecord
from gateway.db import is_deadlock, utcnow
from gateway.device_messages import DeviceMessages
from provisioning.mqtt import Listener, MqttEndpoint, Received
from provisioning.states import FINAL_COMMAND_STATES, CommandKind
from provisioning.wire import Reply, Topics

log = logging.getLogger(__name__)

ReplyHook = Callable[[Session, CommandRecord, Reply], None]


class ReplyHooks:
    def __init__(self) -> None:
        self._hooks: dict[str, list[ReplyHook]] = {}

    def register(self, kind: CommandKind, hook: ReplyHook) -> None:
        self._hooks.setdefault(kind, []).append(hook)

    def for_kind(self, kind: str) -> list[ReplyHook]:
        return self._hooks.get(kind, [])


def apply_reply(
    session: Session, device_id: str, reply: Reply, hooks: ReplyHooks, *, commit: bool = True
) -> CommandRecord | None:
    """Store one reply. The device is the one the topic names (the broker vouched for it); a reply
    about another device's command is ignored. With ``commit=False`` the caller commits (the
    reply listener stores many replies in one transaction)."""
    record = session.get(CommandRecord, reply.command_id)
    if record is None or record.device_id != device_id:
        log.debug("reply from %s about unknown command %s ignored", device_id, reply.command_id)
        return None
    if record.state in FINAL_COMMAND_STATES:
        # The result is in. A late progress message, or the agent re-reporting the result of a
        # command it got twice, changes nothing and must not run the hooks again.
        return record
    record.state = reply.state
    record.detail = reply.detail
    if reply.data:
        record.result = dict(reply.data)
    record.updated_at = utcnow()
    session.add(record)
    for hook in hooks.for_kind(record.kind):
        hook(session, record, reply)
    if commit:
        session.commit()
    return record


def superseding(replies: list[tuple[str, Reply]]) -> list[tuple[str, Reply]]:
    """The replies of a group that still matter, in arrival order: per command its first
    result, or without one its latest progress report.

    A device reports progress (downloading, installing, applying) and then one result. When
    these arrive together, the earlier ones are already out of date: storing only the last
    leaves the same rows behind with a fraction of the writes. Replies after a result change
    nothing (`apply_reply` ignores them), so they are dropped here too.
    """
    keep: dict[tuple[str, str], int] = {}  # (device, command) -> index in `replies`
    for index, (device_id, reply) in enumerate(replies):
        key = (device_id, reply.command_id)
        kept = keep.get(key)
        if kept is None or replies[kept][1].state not in FINAL_COMMAND_STATES:
            keep[key] = index
    return [replies[index] for index in sorted(keep.values())]


class ReplyListener(Listener):
    """Reads ``$share/gateway/{prefix}/+/reply`` and stores the replies off the network thread.

    The writer (`provisioning.mqtt.QueueWorker`) takes every reply queued meanwhile (up to
    `max_group`) and stores them in one transaction: a rollout to a thousand machines brings
    thousands of progress replies within seconds, and one transaction each would make this single
    writer the bottleneck of a push (bench/flow_push_bench.py measures it). Of the replies about
    one command in one group only the one that decides the outcome is stored (`superseding`). If
    the group's transaction fails because of one bad reply, the replies are stored one by one so
    the others still get in; if the database is unreachable, the group is kept and tried again
    with backoff, nothing dropped.
    """

    def __init__(
        self,
        endpoint: MqttEndpoint,
        engine: Engine,
        topics: Topics,
        hooks: ReplyHooks,
        messages: DeviceMessages | None = None,
    ) -> None:
        super().__init__(endpoint, "reply", "reply listener")
        self._engine = engine
        self._topics = topics
        self._hooks = hooks
        self._messages = messages or DeviceMessages()
        self.processed = 0  # replies handled (stored or refused), for metrics and tests

    def subscribe(self, client: mqtt.Client) -> None:
        client.subscribe(self._topics.shared("reply"), qos=1)

    def store(self, group: list[Received]) -> None:
        self._store_group(self._parse(group))
        self.processed += len(group)

    def _parse(self, group: list[tuple[str, bytes]]) -> list[tuple[str, Reply]]:
        """The well-formed replies of a group, with the device each one's topic names."""
        parsed: list[tuple[str, Reply]] = []
        for topic, payload in group:
            where = self._topics.parse(topic)
            if where is None:
                continue
            reply = self._messages.reply(where[0], payload)
            if reply is not None:
                parsed.append((where[0], reply))
        return parsed

    def _store_group(self, replies: list[tuple[str, Reply]]) -> None:
        # In device order, as the scheduler writes a wave's rows: writers that lock rows in one
        # order cannot deadlock each other (a command's replies keep their order: stable sort).
        replies = sorted(superseding(replies), key=lambda item: item[0])
        delay = 0.5
        while replies:
            try:
                with Session(self._engine, expire_on_commit=False) as session:
                    ids = [reply.command_id for _device, reply in replies]
                    # One query for the group's commands; apply_reply finds them in the session
                    # (kept referenced until the commit: the session holds objects weakly).
                    loaded = session.exec(
                        select(CommandRecord).where(col(CommandRecord.id).in_(ids))
                    ).all()
                    unknown = [
                        (device_id, reply.command_id)
                        for device_id, reply in replies
                        if apply_reply(session, device_id, reply, self._hooks, commit=False) is None
                    ]
                    session.commit()
                    for device_id, command_id in unknown:
                        self._messages.unknown_command(device_id, command_id)
                    del loaded
                return
            except OperationalError as exc:  # the database is away: keep the group, try again
                if is_deadlock(exc):
                    log.info("deadlock with another writer; storing %d replies again", len(replies))
                    continue
                reason = str(exc.orig or exc).strip().splitlines()[0]
                log.error(
                    "cannot store %d replies (%s); retrying in %.1fs", len(replies), reason, delay
                )
                if self.stopping.wait(delay):
                    log.error("stopping: %d replies not stored", len(replies))
                    return
                delay = min(30.0, delay * 2)
            except Exception:
                if len(replies) == 1:
                    log.exception("could not store a reply from %s", replies[0][0])
                    return
                log.warning("storing %d replies together failed; one by one", len(replies))
                for single in replies:
                    self._store_group([single])
                return
