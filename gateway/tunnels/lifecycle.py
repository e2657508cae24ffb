"""State changes of a tunnel, each a compare-and-set on its stored state.

Several actors move a tunnel (the API, the reply hooks on any replica, the reaper on the leader,
the hub runner on the hub replica). Every move is an `UPDATE ... WHERE state IN (expected)`, so
when two race, one wins and the other sees it lost and does nothing: a tunnel is never finalized
twice and never finalized while its peers are still on the hub.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col, select

from gateway.commands.sender import issue
from gateway.db import utcnow
from gateway.errors import Unavailable
from gateway.registry import audit
from gateway.runtime import GatewayRuntime
from gateway.tunnels import addresses, states
from gateway.tunnels.models import TunnelRecord
from gateway.tunnels.wireguard.hub import TunnelStats
from provisioning.jwt_rules import MAX_COMMAND_LIFETIME
from provisioning.states import TUNNEL_FINAL, CommandKind, TunnelState
from provisioning.tunnel_command import TunnelCloseArgs

log = logging.getLogger(__name__)

#: tunnel.close stays valid at least this long, so a device that comes back soon still gets it.
MIN_CLOSE_LIFETIME = 300


def transition(session: Session, tunnel_id: str, from_states: Iterable[str], **values: Any) -> bool:
    """Set `values` on the tunnel if its state is one of `from_states`; whether it was."""
    expected = list(from_states)
    if not expected:
        return False
    result = session.execute(
        sa.update(TunnelRecord)
        .where(col(TunnelRecord.id) == tunnel_id, col(TunnelRecord.state).in_(expected))
        .values(**values)
    )
    changed: int = result.rowcount  # type: ignore[attr-defined]
    return changed == 1


def reload(session: Session, tunnel_id: str) -> TunnelRecord | None:
    """The stored row as it is now (after Core updates in this session)."""
    return session.get(TunnelRecord, tunnel_id, populate_existing=True)


def finalize(
    session: Session,
    tunnel: TunnelRecord,
    *,
    final_state: TunnelState,
    reason: str,
    actor: str,
    now: datetime,
    from_states: Iterable[str],
    failure: str | None = None,
    stats: TunnelStats | None = None,
    device_close_due: bool = True,
) -> bool:
    """Move the tunnel to its final state, free its addresses and write the audit entry.

    Call it only for states whose peers are not (or no longer) on the hub.
    """
    values: dict[str, Any] = {
        "state": final_state,
        "close_state": final_state,
        "close_reason": reason,
        "closed_by": actor,
        "closed_at": now,
        "failure": failure,
        "active_device": None,
        "device_close_due": device_close_due,
    }
    if stats is not None and stats.device is not None:
        values["bytes_from_device"] = stats.bytes_from_device
        values["bytes_to_device"] = stats.bytes_to_device
    if not transition(session, tunnel.id, from_states, **values):
        return False
    addresses.release(session, tunnel.id, now)
    row = reload(session, tunnel.id) or tunnel
    audit.record(
        session,
        actor,
        states.AUDIT_ACTION[final_state],
        target=row.device_id,
        tunnel_id=row.id,
        why=reason,
        opened_by=row.actor,
        open_reason=row.reason,
        ports=list(row.ports),
        bytes_from_device=row.bytes_from_device,
        bytes_to_device=row.bytes_to_device,
        seconds_open=round((now - row.opened_at).total_seconds(), 1) if row.opened_at else 0,
    )
    log.info("tunnel %s to %s %s: %s", row.id, row.device_id, final_state, reason)
    return True


def begin_close(
    session: Session,
    tunnel: TunnelRecord,
    *,
    final_state: TunnelState,
    reason: str,
    actor: str,
    now: datetime,
    failure: str | None = None,
    from_states: Iterable[str] = states.LIVE,
    device_close_due: bool = True,
) -> bool:
    """Start ending a live tunnel. One the hub never took is final at once; one with peers on
    the hub goes to `closing` and the hub runner finishes it. Whether this call changed it."""
    allowed = set(from_states)
    never_on_hub = [s for s in (TunnelState.requested, TunnelState.prepared) if s in allowed]
    if finalize(
        session,
        tunnel,
        final_state=final_state,
        reason=reason,
        actor=actor,
        now=now,
        from_states=never_on_hub,
        failure=failure,
        device_close_due=device_close_due,
    ):
        return True
    on_hub = [s for s in (TunnelState.dialing, TunnelState.open) if s in allowed]
    return transition(
        session,
        tunnel.id,
        on_hub,
        state=TunnelState.closing,
        close_state=final_state,
        close_reason=reason,
        closed_by=actor,
        failure=failure,
    )


def fail(
    session: Session,
    tunnel: TunnelRecord,
    failure: str,
    reason: str,
    from_states: Iterable[str],
) -> bool:
    """The gateway ends a tunnel that did not open (`begin_close` as `failed`), and commits."""
    changed = begin_close(
        session,
        tunnel,
        final_state=TunnelState.failed,
        reason=reason,
        actor="gateway",
        now=utcnow(),
        failure=failure,
        from_states=from_states,
    )
    session.commit()
    return changed


def send_device_closes(session: Session, runtime: GatewayRuntime, now: datetime) -> int:
    """Send `tunnel.close` for final tunnels whose device may still hold its side; how many.

    Each is claimed (compare-and-set on `device_close_sent_at`) before it is sent, so two
    replicas do not both send it; a send that fails is released for the next try.
    """
    due = session.exec(
        select(TunnelRecord).where(
            col(TunnelRecord.device_close_due).is_(True),
            col(TunnelRecord.device_close_sent_at).is_(None),
        )
    ).all()
    sent = 0
    for tunnel in due:
        claimed = session.execute(
            sa.update(TunnelRecord)
            .where(
                col(TunnelRecord.id) == tunnel.id,
                col(TunnelRecord.device_close_sent_at).is_(None),
            )
            .values(device_close_sent_at=now)
        )
        session.commit()
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            continue
        lifetime = max(MIN_CLOSE_LIFETIME, math.ceil((tunnel.expires_at - now).total_seconds()))
        try:
            issue(
                session,
                identity=runtime.identity,
                publisher=runtime.command_publisher(),
                device_id=tunnel.device_id,
                kind=CommandKind.tunnel_close,
                args=TunnelCloseArgs(tunnel_id=tunnel.id, reason=tunnel.close_reason or "closed"),
                lifetime=min(lifetime, MAX_COMMAND_LIFETIME),
                actor=tunnel.closed_by or "gateway",
                ref=tunnel.id,
            )
            sent += 1
        except Unavailable as exc:
            log.warning("tunnel %s: cannot tell the device to close yet: %s", tunnel.id, exc)
            session.rollback()
            transition(
                session,
                tunnel.id,
                TUNNEL_FINAL,
                device_close_sent_at=None,
            )
            session.commit()
    return sent
