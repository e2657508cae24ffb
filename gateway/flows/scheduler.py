"""The rollout scheduler: sends each wave, marks devices that time out, stops bad rollouts.

It runs as a singleton job: only the leader replica (the holder of a PostgreSQL advisory lock;
with SQLite the single replica) ticks it, so with several replicas on one database one sends
commands. All state is in the database: a replica that takes over continues where the last one
stopped.

A device is never sent its command twice. Before a command is signed the device's record is
claimed with a conditional update (`pending` -> `sent`, only while the deployment runs), so a
second sender, a concurrent cancel, or a retry cannot claim it again. If the broker is not
connected the claim is undone (nothing was published) and the wave is retried on the next tick;
if the broker took the command but did not confirm it, the device keeps its claim and its result
or its timeout decides. A claim left by a replica that died before it recorded a command is
undone after a grace period; one whose command was recorded is completed instead.

One tick, per running deployment:
1. devices in flight past their deadline become `failed` (timed out);
2. if at least `min_finished` devices finished and more than `max_failures_pct` of them did not
   succeed, the deployment is `aborted`: the remaining waves are never sent;
3. otherwise the lowest wave with pending devices is sent once every wave before it finished;
4. when every device finished: `succeeded`, or `partial` if some did not succeed.

A deployment's end (`succeeded`, `partial` or `aborted`) is audited as `flows.finish` in the
transaction that ends it, so it is recorded once whichever leader ends it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from gateway.commands.models import CommandRecord
from gateway.commands.publisher import CommandPublisher
from gateway.commands.sender import Issued, issue_many
from gateway.db import retry_deadlocks, utcnow
from gateway.errors import Unavailable
from gateway.flows.models import Deployment, DeploymentDevice, FlowRelease
from gateway.flows.module_cache import modules_by_ref
from gateway.identity import GatewayIdentity
from gateway.registry import audit
from provisioning.deploy_command import DeployArgs
from provisioning.states import (
    DEPLOY_FAILURES,
    DEPLOY_FINAL,
    DEPLOY_IN_FLIGHT,
    CommandKind,
    DeploymentState,
    DeviceDeployState,
)

__all__ = ["RolloutScheduler", "TickReport"]

log = logging.getLogger(__name__)

UNSENT_GRACE: Final = timedelta(seconds=60)
_SEND_CHUNK: Final = 200  # commands signed, recorded and published together
_UNCONFIRMED: Final = (
    "the broker did not confirm the command; waiting for the device's answer or the timeout"
)


class TickReport:
    """What one tick did (for logs and tests)."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.timed_out: list[str] = []
        self.finished: dict[str, str] = {}

    def __repr__(self) -> str:
        return (
            f"TickReport(sent={len(self.sent)}, "
            f"timed_out={len(self.timed_out)}, finished={self.finished})"
        )


#: What undoing a device's claim resets (its command was never published).
_UNCLAIMED: Final = {"state": DeviceDeployState.pending, "sent_at": None, "deadline_at": None}


def _table(model: Any) -> sa.Table:
    table: sa.Table = model.__table__
    return table


class RolloutScheduler:
    """Advances deployments. `tick()` does one round; the gateway runs it as a singleton job
    (`gateway.leader.SingletonJobs`), so only the leader replica calls it."""

    def __init__(
        self,
        engine: Engine,
        identity: GatewayIdentity,
        publisher: Callable[[], CommandPublisher],
    ) -> None:
        self._engine = engine
        self._identity = identity
        self._publisher = publisher
        self._tick_lock = threading.Lock()

    def run(self) -> None:
        """One tick, as a singleton job."""
        self.tick()

    def tick(self, now: datetime | None = None) -> TickReport:
        report = TickReport()
        with self._tick_lock:
            now = now or utcnow()
            with Session(self._engine, expire_on_commit=False) as session:
                self._recover_unsent(session, now)
                self._expire(session, now, report)
                running = list(
                    session.exec(
                        select(Deployment.id)
                        .where(Deployment.state == DeploymentState.running)
                        .order_by(col(Deployment.created_at))
                    )
                )
                for deployment_id in running:
                    self._advance(session, deployment_id, now, report)
        if report.sent or report.timed_out or report.finished:
            log.debug("rollout tick: %r", report)
        return report

    def _recover_unsent(self, session: Session, now: datetime) -> None:
        """Claims a dead replica left without a command id: complete or undo them."""
        table = _table(DeploymentDevice)
        rows = session.execute(
            sa.select(table.c.deployment_id, table.c.device_id).where(
                table.c.state == DeviceDeployState.sent,
                table.c.command_id.is_(None),
                table.c.sent_at < now - UNSENT_GRACE,
            )
        ).all()
        for deployment_id, device_id in rows:
            record = session.exec(
                select(CommandRecord)
                .where(CommandRecord.ref == deployment_id, CommandRecord.device_id == device_id)
                .order_by(col(CommandRecord.created_at).desc())
            ).first()
            where = (
                table.c.deployment_id == deployment_id,
                table.c.device_id == device_id,
                table.c.state == DeviceDeployState.sent,
                table.c.command_id.is_(None),
            )
            if record is not None:
                session.execute(sa.update(table).where(*where).values(command_id=record.id))
            else:
                log.warning(
                    "undoing a claim on %s/%s that was never sent", deployment_id, device_id
                )
                session.execute(sa.update(table).where(*where).values(**_UNCLAIMED, updated_at=now))
        session.commit()

    def _expire(self, session: Session, now: datetime, report: TickReport) -> None:
        table = _table(DeploymentDevice)
        late = session.execute(
            sa.select(
                table.c.deployment_id,
                table.c.device_id,
                table.c.state,
                table.c.sent_at,
                table.c.deadline_at,
            ).where(table.c.state.in_(sorted(DEPLOY_IN_FLIGHT)), table.c.deadline_at < now)
        ).all()
        for deployment_id, device_id, state, sent_at, deadline_at in late:
            waited = int((deadline_at - sent_at).total_seconds()) if sent_at else 0
            result = session.execute(
                sa.update(table)
                .where(
                    table.c.deployment_id == deployment_id,
                    table.c.device_id == device_id,
                    table.c.state == state,  # a result that arrived meanwhile wins
                )
                .values(
                    state=DeviceDeployState.failed,
                    error=f"timed out: no result {waited}s after the command was sent "
                    f"(last state: {state})",
                    finished_at=now,
                    updated_at=now,
                )
            )
            if result.rowcount:  # type: ignore[attr-defined]
                report.timed_out.append(device_id)
        session.commit()

    def _advance(
        self, session: Session, deployment_id: str, now: datetime, report: TickReport
    ) -> None:
        deployment = session.get(Deployment, deployment_id, populate_existing=True)
        if deployment is None or deployment.state != DeploymentState.running:
            return
        table = _table(DeploymentDevice)
        per_wave: dict[int, dict[str, int]] = {}
        for wave, state, count in session.execute(
            sa.select(table.c.wave, table.c.state, sa.func.count())
            .where(table.c.deployment_id == deployment_id)
            .group_by(table.c.wave, table.c.state)
        ):
            per_wave.setdefault(int(wave), {})[state] = int(count)
        totals: dict[str, int] = {}
        for states in per_wave.values():
            for state, count in states.items():
                totals[state] = totals.get(state, 0) + count
        finished = sum(n for s, n in totals.items() if s in DEPLOY_FINAL)
        failures = sum(n for s, n in totals.items() if s in DEPLOY_FAILURES)

        if finished >= deployment.min_finished and failures * 100 > (
            deployment.max_failures_pct * finished
        ):
            never_sent = totals.get(DeviceDeployState.pending, 0)
            self._finish(
                session,
                deployment,
                DeploymentState.aborted,
                f"{failures} of {finished} finished devices did not succeed "
                f"({failures * 100 / finished:.0f}%), more than the "
                f"{deployment.max_failures_pct:g}% allowed; {never_sent} device(s) of later "
                "waves were not sent the release",
                now,
                report,
            )
            return

        pending_waves = sorted(
            w for w, states in per_wave.items() if states.get(DeviceDeployState.pending)
        )
        if pending_waves:
            wave = pending_waves[0]
            earlier_done = all(
                all(s in DEPLOY_FINAL for s in states) for w, states in per_wave.items() if w < wave
            )
            if earlier_done:
                self._send_wave(session, deployment, wave, now, report)
            return

        if finished == deployment.device_count:
            if failures == 0 and totals.get(DeviceDeployState.succeeded, 0) == finished:
                self._finish(session, deployment, DeploymentState.succeeded, None, now, report)
            else:
                not_ok = finished - totals.get(DeviceDeployState.succeeded, 0)
                self._finish(
                    session,
                    deployment,
                    DeploymentState.partial,
                    f"{not_ok} of {finished} devices did not succeed (under the "
                    f"{deployment.max_failures_pct:g}% abort threshold)",
                    now,
                    report,
                )

    def _finish(
        self,
        session: Session,
        deployment: Deployment,
        state: DeploymentState,
        reason: str | None,
        now: datetime,
        report: TickReport,
    ) -> None:
        table = _table(Deployment)
        result = session.execute(
            sa.update(table)
            .where(
                table.c.id == deployment.id, table.c.state == DeploymentState.running
            )  # a cancel wins
            .values(state=state, reason=reason, finished_at=now, updated_at=now)
        )
        finished = bool(result.rowcount)  # type: ignore[attr-defined]
        if finished:  # in the same transaction: the end is audited once, by whoever ended it
            audit.record(
                session,
                "gateway",
                "flows.finish",
                deployment.id,
                state=state,
                reason=reason,
                release=deployment.release_digest,
            )
        session.commit()
        if finished:
            report.finished[deployment.id] = state
            log.info("deployment %s %s%s", deployment.id, state, f": {reason}" if reason else "")

    def _args(self, session: Session, deployment: Deployment) -> DeployArgs:
        release = session.get(FlowRelease, deployment.release_digest)
        assert release is not None
        cached = modules_by_ref(session, release.modules)
        args = DeployArgs(
            deployment_id=deployment.id,
            release=deployment.release_digest,
            force=deployment.force,
            modules={ref: module.sha256 for ref, module in cached.items()},
        )
        return args

    def _send_wave(
        self,
        session: Session,
        deployment: Deployment,
        wave: int,
        now: datetime,
        report: TickReport,
    ) -> None:
        try:
            publisher = self._publisher()
        except Unavailable as exc:
            log.warning("deployment %s waits: %s", deployment.id, exc.detail)
            return
        table = _table(DeploymentDevice)
        deployments = _table(Deployment)
        still_running = sa.exists().where(
            deployments.c.id == deployment.id, deployments.c.state == DeploymentState.running
        )
        deadline = now + timedelta(seconds=deployment.timeout_seconds)
        claimed = session.execute(
            sa.update(table)
            .where(
                table.c.deployment_id == deployment.id,
                table.c.wave == wave,
                table.c.state == DeviceDeployState.pending,
                still_running,
            )
            .values(state=DeviceDeployState.sent, sent_at=now, deadline_at=deadline, updated_at=now)
            .returning(table.c.device_id, table.c.position)
        ).all()
        session.commit()
        if not claimed:
            return
        log.info(
            "deployment %s: sending wave %d/%d to %d device(s)",
            deployment.id,
            wave + 1,
            deployment.wave_count,
            len(claimed),
        )
        args = self._args(session, deployment)
        order = [device_id for device_id, _ in sorted(claimed, key=lambda row: row[1])]
        for start in range(0, len(order), _SEND_CHUNK):
            chunk = order[start : start + _SEND_CHUNK]
            try:
                issued = issue_many(
                    session,
                    identity=self._identity,
                    publisher=publisher,
                    device_ids=chunk,
                    kind=CommandKind.deploy,
                    args=args,
                    lifetime=deployment.timeout_seconds,
                    actor=deployment.created_by,
                    ref=deployment.id,
                )
            except Unavailable as exc:  # not connected: nothing of this chunk was published
                session.rollback()
                self._unsent(session, deployment.id, order[start:], exc, now)
                return
            self._record_command_ids(session, deployment.id, issued)
            report.sent.extend(chunk)

    @staticmethod
    def _record_command_ids(session: Session, deployment_id: str, issued: list[Issued]) -> None:
        """Note which command each device got, in one transaction for many devices (a reply
        that arrives first sets it too, so nothing waits for this). A command the broker did
        not confirm keeps its device's claim, with a note: its result or its timeout decides."""
        table = _table(DeploymentDevice)
        rows = [
            {
                "b_device": one.device_id,
                "b_id": one.command_id,
                "b_error": None if one.confirmed else _UNCONFIRMED,
            }
            for one in sorted(issued)  # device order, as the reply listener writes
        ]

        def record() -> None:
            session.execute(
                sa.update(table)
                .where(
                    table.c.deployment_id == deployment_id,
                    table.c.device_id == sa.bindparam("b_device"),
                )
                .values(command_id=sa.bindparam("b_id"), error=sa.bindparam("b_error")),
                rows,
            )
            session.commit()

        retry_deadlocks(session, record)
        unconfirmed = sum(1 for one in issued if not one.confirmed)
        if unconfirmed:
            log.warning(
                "deployment %s: the broker did not confirm %d command(s); waiting for the "
                "devices' answers or the timeout",
                deployment_id,
                unconfirmed,
            )

    def _unsent(
        self,
        session: Session,
        deployment_id: str,
        unsent: list[str],
        exc: Unavailable,
        now: datetime,
    ) -> None:
        """The broker was not connected: `unsent` were claimed but nothing was published to
        them; they go back to `pending` for the next try."""
        table = _table(DeploymentDevice)
        session.execute(
            sa.update(table)
            .where(
                table.c.deployment_id == deployment_id,
                table.c.device_id.in_(unsent),
                table.c.state == DeviceDeployState.sent,
            )
            .values(**_UNCLAIMED, updated_at=now)
        )
        session.commit()
        log.warning(
            "deployment %s: the broker is unavailable (%s); %d device(s) wait for the next try",
            deployment_id,
            exc.detail,
            len(unsent),
        )
