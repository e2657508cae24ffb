"""The Alembic migrations build exactly the schema the models describe, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlmodel import Session, SQLModel

from gateway.accounts.api_tokens import authenticate
from gateway.db import MIGRATIONS_DIR, make_engine, migrate
from gateway.registry.models import Device, Role
from gateway.settings import GatewaySettings
from gateway.telemetry.partitions import is_partition
from provisioning.secrets import hash_secret


def _not_a_partition(name: str | None, type_: str, _parent: object) -> bool:
    """Telemetry partitions are made at run time, not by the migrations: left out."""
    return not (type_ == "table" and is_partition(name))


def test_migrations_match_models_and_rerun_cleanly(db_url: str) -> None:
    engine = make_engine(GatewaySettings(db_url=db_url).database_url)
    try:
        migrate(engine)
        migrate(engine)  # a second start changes nothing
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "include_name": _not_a_partition}
            )
            diff = compare_metadata(context, SQLModel.metadata)
            heads = context.get_current_heads()
            assert len(heads) == 1, f"several heads {heads}: add a merge revision"
        # Telemetry and other tables owned elsewhere are compared too once they are models.
        assert diff == [], f"models and migrations disagree: {diff}"
    finally:
        engine.dispose()


def test_an_existing_install_upgrades_in_place(db_url: str, tmp_path: Path) -> None:
    """An install from before accounts (revision 0007): its machines go to stock and its API
    tokens keep working with the role they had."""
    settings = GatewaySettings(db_url=db_url, data_dir=tmp_path)
    engine = make_engine(settings.database_url)
    try:
        with engine.begin() as conn:  # the template is migrated: start this one from scratch
            conn.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
        fresh = make_engine(settings.database_url)
        SQLModel.metadata.drop_all(fresh)
        fresh.dispose()
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0007")
        secret = "efa_" + "s" * 40
        now = datetime.now(UTC)
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO api_tokens (id, name, token_hash, role, created_at, created_by) "
                    "VALUES ('at-old', 'ci', :h, 'operator', :t, 'local-admin')"
                ),
                {"h": hash_secret(secret), "t": now},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO devices (id, name, public_key, key_fingerprint, tags, state, "
                    "online, enrolled_at) VALUES ('dev-old', 'press-1', 'k', 'fp', '{}', "
                    "'active', false, :t)"
                ),
                {"t": now},
            )
        migrate(engine)
        with Session(engine) as session:
            device = session.get(Device, "dev-old")
            assert device is not None and device.customer_id is None  # stock
            who = authenticate(session, secret)
            assert who.role == Role.operator and who.kind.value == "legacy_token"
    finally:
        engine.dispose()
