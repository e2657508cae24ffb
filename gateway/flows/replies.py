"""Moves each device's deployment record as its agent reports on the deploy command.

Registered as the reply hook of `deploy` commands, it runs in the transaction that stores the
reply, on whichever replica got it. Progress never overrides a final state; a final result from the
agent always wins over what the gateway assumed (a timeout or a cancel), because the agent knows
what it did to the machine.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import sqlalchemy as sa
from sqlmodel import Session

from gateway.commands import ReplyHook
from gateway.db import utcnow
from gateway.flows.deployments import FINAL_STATES
from gateway.flows.models import DeploymentDevice
from gateway.models import CommandRecord
from provisioning.wire import Reply

__all__ = ["device_state_of", "make_reply_hook"]

log = logging.getLogger(__name__)

_PROGRESS: Final = {
    "downloading": "downloading",
    "installing": "installing",
    "applying": "applying",
    "verifying": "applying",
}
_FINAL: Final = {
    "succeeded": "succeeded",
    "failed": "failed",
    "rolled_back": "rolled_back",
    "drift": "drift",
    "cancelled": "cancelled",
    "refused": "failed",
    "expired": "failed",
}


def device_state_of(reply_state: str) -> tuple[str, bool] | None:
    """(device state, is final) for an agent's reply state; None for states that say nothing."""
    if reply_state in _PROGRESS:
        return _PROGRESS[reply_state], False
    if reply_state in _FINAL:
        return _FINAL[reply_state], True
    return None


def _error_of(reply: Reply, state: str) -> str | None:
    if state == "succeeded":
        return None
    detail = reply.detail or f"the agent reported {reply.state} without a reason"
    if reply.state == "refused":
        return f"the agent refused the command: {detail}"
    return detail


def make_reply_hook() -> ReplyHook:
    """The `deploy` reply hook (register it with `runtime.hooks.register(DEPLOY_KIND, ...)`)."""

    def on_deploy_reply(session: Session, record: CommandRecord, reply: Reply) -> None:
        mapped = device_state_of(reply.state)
        if record.ref is None or mapped is None:
            return
        state, final = mapped
        row = session.get(DeploymentDevice, (record.ref, record.device_id))
        if row is None:
            log.warning("deploy reply for %s/%s: no such record", record.ref, record.device_id)
            return
        if row.command_id not in (None, record.id):
            return  # about another command than the one this record follows
        now = utcnow()
        values: dict[str, Any] = {"command_id": record.id, "updated_at": now}
        if not final:
            if row.state in FINAL_STATES:
                return
            values["state"] = state
            values["started_at"] = row.started_at or now
        else:
            error = _error_of(reply, state)
            if row.state in FINAL_STATES and row.state != state:
                note = f"reported after the gateway had marked it {row.state}"
                error = f"{error} ({note})" if error else note
            rev = reply.data.get("rev")
            values.update(
                state=state,
                error=error,
                finished_at=now,
                started_at=row.started_at or now,
                rev=str(rev)[:64] if isinstance(rev, str) else row.rev,
            )
        table = DeploymentDevice.__table__  # type: ignore[attr-defined]
        session.execute(
            sa.update(table)
            .where(table.c.deployment_id == row.deployment_id, table.c.device_id == row.device_id)
            .values(**values)
        )

    return on_deploy_reply
