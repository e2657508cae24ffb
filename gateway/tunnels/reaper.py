"""The tunnel reaper: a singleton job (one replica at a time) that ends tunnels on time.

Every run it expires tunnels past their TTL, fails tunnels that did not open by their deadline,
and tells devices to drop their side of tunnels that ended. It only changes database rows; the
hub runner takes the peers off the hub. Each step is its own transaction, so a run cut off by a
leader change is simply done again by the next leader.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlmodel import Session, col, select

from gateway.db import utcnow
from gateway.runtime import GatewayRuntime
from gateway.tunnels import states
from gateway.tunnels.lifecycle import begin_close, send_device_closes
from gateway.tunnels.models import TunnelRecord
from gateway.tunnels.service import fail_if_late, span
from provisioning.states import TunnelState

log = logging.getLogger(__name__)

INTERVAL = 1.0
#: The API's own wait fails a late open at its deadline; the reaper catches the ones nobody
#: waited for (the client went away) this much later.
DEADLINE_GRACE = 2.0


def reap(runtime: GatewayRuntime) -> None:
    now = utcnow()
    with Session(runtime.engine, expire_on_commit=False) as session:
        due = session.exec(
            select(TunnelRecord).where(
                col(TunnelRecord.state).in_(states.LIVE), col(TunnelRecord.expires_at) <= now
            )
        ).all()
        for tunnel in due:
            ttl = (tunnel.expires_at - tunnel.created_at).total_seconds()
            begin_close(
                session,
                tunnel,
                final_state=TunnelState.expired,
                reason=f"reached the end of its {span(ttl)} lifetime",
                actor="gateway",
                now=now,
            )
            session.commit()
        late = session.exec(
            select(TunnelRecord).where(
                col(TunnelRecord.state).in_(states.OPENING),
                col(TunnelRecord.open_deadline) <= now - timedelta(seconds=DEADLINE_GRACE),
            )
        ).all()
        for tunnel in late:
            fail_if_late(session, runtime, tunnel)
        send_device_closes(session, runtime, now)
