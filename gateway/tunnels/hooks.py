"""What the gateway does with the device's answers to tunnel commands (on whichever replica).

Each hook runs in the transaction that stores the reply. It moves the tunnel only from the state
it expects, so a repeated or late reply (a replayed command is answered again with its old
result) changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlmodel import Session

from gateway.commands.models import CommandRecord
from gateway.commands.replies import ReplyHooks
from gateway.db import utcnow
from gateway.tunnels.lifecycle import begin_close, transition
from gateway.tunnels.models import TunnelRecord
from gateway.tunnels.states import TunnelFailure
from provisioning.states import FINAL_COMMAND_STATES, CommandKind, CommandState, TunnelState
from provisioning.wire import Reply
from provisioning.wireguard.keys import WgKeyError, normalize_public_key

Notify = Callable[[], None]


def _tunnel(session: Session, record: CommandRecord) -> TunnelRecord | None:
    return session.get(TunnelRecord, record.ref) if record.ref else None


def _device_key(tunnel: TunnelRecord, reply: Reply) -> str | None:
    try:
        key = normalize_public_key(str(reply.data.get("public_key", "")), "device public key")
    except WgKeyError:
        return None
    if key in (tunnel.engineer_public_key, tunnel.hub_public_key):
        return None
    return key


class TunnelReplyHooks:
    """The hooks for `tunnel.open`, `tunnel.connect` and `tunnel.close` replies.

    `notify` (the hub runner's wake-up, on the hub replica) runs after the commit that made a
    tunnel ready for the hub, so the hub adds its peers at once instead of at its next poll.
    """

    def __init__(self, notify: Notify | None = None) -> None:
        self._notify = notify

    def register(self, hooks: ReplyHooks) -> None:
        hooks.register(CommandKind.tunnel_open, self.on_open)
        hooks.register(CommandKind.tunnel_connect, self.on_connect)
        hooks.register(CommandKind.tunnel_close, self.on_close)

    def _wake_after_commit(self, session: Session) -> None:
        notify = self._notify
        if notify is not None:
            sa.event.listen(session, "after_commit", lambda _s: notify(), once=True)

    def on_open(self, session: Session, record: CommandRecord, reply: Reply) -> None:
        tunnel = _tunnel(session, record)
        if tunnel is None or tunnel.state != TunnelState.requested:
            return
        if reply.state == CommandState.succeeded:
            key = _device_key(tunnel, reply)
            if key is not None:
                if transition(
                    session,
                    tunnel.id,
                    (TunnelState.requested,),
                    state=TunnelState.prepared,
                    device_public_key=key,
                ):
                    self._wake_after_commit(session)
                return
            failure, reason = TunnelFailure.device_failed, "the device answered without a valid key"
            close_due = True
        elif reply.state in FINAL_COMMAND_STATES:
            refused = reply.state == CommandState.refused
            failure = TunnelFailure.device_refused if refused else TunnelFailure.device_failed
            said = reply.detail or reply.state
            reason = f"the device refused: {said}" if refused else f"the device failed: {said}"
            close_due = False  # it brought nothing up (or removed what it had made)
        else:
            return  # progress
        begin_close(
            session,
            tunnel,
            final_state=TunnelState.failed,
            reason=reason,
            actor=f"device {tunnel.device_id}",
            now=utcnow(),
            failure=failure,
            from_states=(TunnelState.requested,),
            device_close_due=close_due,
        )

    def on_connect(self, session: Session, record: CommandRecord, reply: Reply) -> None:
        tunnel = _tunnel(session, record)
        if (
            tunnel is None
            or reply.state == CommandState.succeeded
            or reply.state not in FINAL_COMMAND_STATES
        ):
            return
        if begin_close(
            session,
            tunnel,
            final_state=TunnelState.failed,
            reason=f"the device could not dial the hub: {reply.detail or reply.state}",
            actor=f"device {tunnel.device_id}",
            now=utcnow(),
            failure=TunnelFailure.device_failed,
            from_states=(TunnelState.dialing,),
        ):
            self._wake_after_commit(session)

    def on_close(self, session: Session, record: CommandRecord, reply: Reply) -> None:
        tunnel = _tunnel(session, record)
        if (
            tunnel is not None
            and reply.state == CommandState.succeeded
            and tunnel.device_closed_at is None
        ):
            tunnel.device_closed_at = utcnow()
            session.add(tunnel)
