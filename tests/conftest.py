"""Shared fixtures: a real supervised Mosquitto, real databases (SQLite and PostgreSQL), the app.

PostgreSQL: each test gets its own database, cloned from a migrated template made once per
session (CREATE DATABASE ... TEMPLATE, done while the test before runs), and dropped afterwards.
SQLite likewise: each test gets its own file, a copy of one migrated once per session (migrating
a new file takes longer).
"""

from __future__ import annotations

import gc
import os
import sqlite3
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager, suppress
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.broker.admin import DeviceBrokerInfo
from gateway.broker.dynsec import DynsecAdmin
from gateway.broker.mosquitto import MosquittoSupervisor
from gateway.db import make_engine, migrate
from gateway.identity import GatewayIdentity
from gateway.registry.models import Role
from gateway.runtime import GatewayRuntime
from gateway.settings import GatewaySettings
from tests.support.accounts import user_token
from tests.support.mosquitto import running_broker

PG_ADMIN_URL = os.environ.get("EDGEFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pytest_collection_finish(session: pytest.Session) -> None:
    """What the imports and the collection built lives until the end of the run: keep the
    garbage collector from walking it again and again (10-20% of this process's CPU time)."""
    gc.freeze()


def _pg_url(database: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{database}"


def _pg_admin() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(PG_ADMIN_URL, autocommit=True)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated PostgreSQL database to clone; its name."""
    name = f"edgefleet_tpl_{uuid.uuid4().hex[:8]}"
    try:
        with _pg_admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is needed (set EDGEFLEET_TEST_PG): {exc}")
    engine = make_engine(GatewaySettings(db_url=_pg_url(name)).database_url)
    migrate(engine)
    engine.dispose()
    yield name
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _clone(template: str) -> str:
    """CREATE DATABASE ... TEMPLATE `template`; the new database's name."""
    name = f"edgefleet_t_{uuid.uuid4().hex[:10]}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return name


def _drop(name: str) -> None:
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_pg_database(template: str) -> Iterator[str]:
    """A new, migrated PostgreSQL database cloned from `template`; its plain postgresql:// URL."""
    name = _clone(template)
    try:
        yield _pg_url(name)
    finally:
        _drop(name)


class PgClones:
    """Databases for the tests, cloned and dropped in the background while tests run.

    A clone takes ~0.3 s, most of a PostgreSQL test's setup; the next one is made while the test
    before runs, and each is handed to one test, untouched. A drop waits for a clone in progress
    (PostgreSQL makes it), so drops too happen beside the tests; the last ones by the session's end.
    """

    def __init__(self, template: str) -> None:
        self._template = template
        self._cloner = ThreadPoolExecutor(1, thread_name_prefix="pg-clone")
        self._dropper = ThreadPoolExecutor(1, thread_name_prefix="pg-drop")
        self._next: Future[str] | None = None
        self._drops: list[Future[None]] = []

    def take(self) -> str:
        """A fresh database's name; hand it back with `drop`."""
        made = self._next or self._cloner.submit(_clone, self._template)
        self._next = self._cloner.submit(_clone, self._template)
        return made.result()

    def drop(self, name: str) -> None:
        self._drops.append(self._dropper.submit(_drop, name))

    def close(self) -> None:
        """Drop the clone made for a test that never came; wait for every drop (a failed one
        fails here)."""
        if self._next is not None:
            with suppress(Exception):  # its creation failed: nothing to drop
                self.drop(self._next.result())
        self._cloner.shutdown()
        self._dropper.shutdown()
        for dropped in self._drops:
            dropped.result()


@pytest.fixture(scope="session")
def pg_clones(pg_template: str) -> Iterator[PgClones]:
    clones = PgClones(pg_template)
    yield clones
    clones.close()


@pytest.fixture
def pg_database(pg_clones: PgClones) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test."""
    name = pg_clones.take()
    try:
        yield _pg_url(name)
    finally:
        pg_clones.drop(name)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database file to copy."""
    path = tmp_path_factory.mktemp("sqlite-template") / "registry.db"
    engine = make_engine(GatewaySettings(db_url=f"sqlite:///{path}").database_url)
    migrate(engine)
    engine.dispose()
    return path


def fresh_sqlite_database(template: Path, path: Path) -> str:
    """A new, migrated SQLite database at `path`, copied from `template`; its sqlite:/// URL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The backup API copies a consistent database whatever its journal mode (WAL here).
    with closing(sqlite3.connect(template)) as source, closing(sqlite3.connect(path)) as copy:
        source.backup(copy)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The registry tests run once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        return fresh_sqlite_database(template, tmp_path / "registry.db")
    url: str = request.getfixturevalue("pg_database")
    return url


@pytest.fixture(scope="session")
def broker() -> Iterator[MosquittoSupervisor]:
    with running_broker() as supervisor:
        yield supervisor


@pytest.fixture(scope="session")
def dynsec(broker: MosquittoSupervisor) -> Iterator[DynsecAdmin]:
    with DynsecAdmin(broker.endpoint) as admin:
        yield admin


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> GatewaySettings:
    return GatewaySettings(data_dir=tmp_path / "gateway", db_url=db_url)


@pytest.fixture
def runtime(
    settings: GatewaySettings, broker: MosquittoSupervisor, dynsec: DynsecAdmin
) -> Iterator[GatewayRuntime]:
    engine = make_engine(settings.database_url)
    migrate(engine)
    identity = GatewayIdentity.load_or_create(settings.signing_key_path)
    info = DeviceBrokerInfo("127.0.0.1", broker.port, True, broker.ca.cert_pem)
    yield GatewayRuntime(settings, engine, identity, dynsec, info)
    engine.dispose()


@pytest.fixture
def client(runtime: GatewayRuntime) -> Iterator[TestClient]:
    # https: the session cookie is Secure, and the client sends it only there.
    with TestClient(create_app(runtime), base_url="https://testserver") as test_client:
        yield test_client


def api_token(runtime: GatewayRuntime, role: Role) -> str:
    """A new manufacturer user of `role` and their API token."""
    return user_token(runtime.engine, role)


@pytest.fixture
def admin_headers(runtime: GatewayRuntime) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_token(runtime, Role.admin)}"}
