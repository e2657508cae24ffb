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

from gateway.commands.models import CommandRecord
from gateway.commands.replies import ReplyHook
from gateway.db import utcnow
from gateway.flows.models import DeploymentDevice
from provisioning.states import DEPLOY_FINAL, DEPLOY_PROGRESS, CommandState, DeviceDeployState
from provisioning.wire import Reply

__all__ = ["device_state_of", "make_reply_hook"]

log = logging.getLogger(__name__)

_FINAL: Final[dict[str, DeviceDeployState]] = {
    **{state: state for state in DEPLOY_FINAL},
    CommandState.refused: DeviceDeployState.failed,
    CommandState.expired: DeviceDeployState.failed,
}
"""A final reply state -> the device's final state (the agent's own are the same words)."""


def device_state_of(reply_state: str) -> tuple[DeviceDeployState, bool] | None:
    """(device state, is final) for an agent's reply state; None for states that say nothing.

    Progress is one of `DEPLOY_PROGRESS` (the contract in `provisioning.deploy_command`)."""
    if reply_state in DEPLOY_PROGRESS:
        return DeviceDeployState(reply_state), False
    if reply_state in _FINAL:
        return _FINAL[reply_state], True
    return None


def _error_of(reply: Reply, state: DeviceDeployState) -> str | None:
    if state == DeviceDeployState.succeeded:
        return None
    detail = reply.detail or f"the agent reported {reply.state} without a reason"
    if reply.state == CommandState.refused:
        return f"the agent refused the command: {detail}"
    return detail


def make_reply_hook() -> ReplyHook:
    """The `deploy` reply hook (registered by `gateway.flows.wiring`).

    Each reply is one conditional UPDATE (no read first): this runs for every progress message
    of every device, in the reply listener's single writer thread.
    """
    table: sa.Table = DeploymentDevice.__table__  # type: ignore[attr-defined]
    final_states = sorted(DEPLOY_FINAL)

    def on_deploy_reply(session: Session, record: CommandRecord, reply: Reply) -> None:
        mapped = device_state_of(reply.state)
        if record.ref is None or mapped is None:
            return
        state, final = mapped
        now = utcnow()
        where = [
            table.c.deployment_id == record.ref,
            table.c.device_id == record.device_id,
            # about the command this record follows (or before the gateway noted its id)
            sa.or_(table.c.command_id.is_(None), table.c.command_id == record.id),
        ]
        values: dict[str, Any] = {
            "command_id": record.id,
            "updated_at": now,
            "state": state,
            "started_at": sa.func.coalesce(table.c.started_at, now),
        }
        if not final:
            where.append(table.c.state.not_in(final_states))
        else:
            error = _error_of(reply, state)
            overridden = sa.and_(table.c.state.in_(final_states), table.c.state != state)
            note = sa.literal(" (reported after the gateway had marked it ") + table.c.state + ")"
            if error is None:
                values["error"] = sa.case(
                    (
                        overridden,
                        sa.literal("reported after the gateway had marked it ") + table.c.state,
                    ),
                    else_=sa.null(),
                )
            else:
                values["error"] = sa.case((overridden, sa.literal(error) + note), else_=error)
            rev = reply.data.get("rev")
            if isinstance(rev, str):
                values["rev"] = rev[:64]
            values["finished_at"] = now
        result = session.execute(sa.update(table).where(*where).values(**values))
        if not result.rowcount:  # type: ignore[attr-defined]
            log.debug(
                "deploy reply %s for %s/%s changed nothing",
                reply.state,
                record.ref,
                record.device_id,
            )

    return on_deploy_reply
