"""Leader election for singleton jobs, on a real PostgreSQL (and the SQLite single-replica case)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from gateway.db import make_engine
from gateway.leader import LeaderElection, SingletonJobs
from gateway.settings import GatewaySettings
from tests.support.waiting import wait_for


def _engine(url: str) -> Engine:
    return make_engine(GatewaySettings(db_url=url).database_url)


def test_sqlite_replica_is_always_the_leader(tmp_path: Path) -> None:
    election = LeaderElection(_engine(f"sqlite:///{tmp_path / 'x.db'}"))
    assert election.check() and election.check()


@pytest.mark.postgres
def test_one_leader_among_replicas_and_takeover_when_it_goes(pg_database: str) -> None:
    first = LeaderElection(_engine(pg_database), retry=0.1)
    second = LeaderElection(_engine(pg_database), retry=0.1)
    assert first.check()
    assert not second.check()
    assert first.check()  # stays leader
    first.resign()
    wait_for(second.check, timeout=5, what="the second replica to take over")
    assert not first.check()


@pytest.mark.postgres
def test_a_killed_leader_process_is_replaced_and_jobs_run_once_at_a_time(
    pg_database: str, tmp_path: Path
) -> None:
    """A real process holds the lock; kill -9 it; this one takes over within a few seconds."""
    marker = tmp_path / "leader-ready"
    script = textwrap.dedent(f"""
        import time, pathlib
        from gateway.db import make_engine
        from gateway.leader import LeaderElection
        from gateway.settings import GatewaySettings
        e = LeaderElection(make_engine(GatewaySettings(db_url={pg_database!r}).database_url))
        assert e.check()
        pathlib.Path({str(marker)!r}).write_text("leader")
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd())
    try:
        wait_for(marker.exists, timeout=20, what="the other process to become leader")
        runs: list[str] = []
        jobs = SingletonJobs(LeaderElection(_engine(pg_database), retry=0.2))
        jobs.add("count", 0.0, lambda: runs.append("ran"))
        jobs.run_due()
        assert not jobs.is_leader and runs == []
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

        def took_over() -> bool:
            jobs.run_due()
            return jobs.is_leader

        wait_for(took_over, timeout=10, what="takeover")
        assert runs == ["ran"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
