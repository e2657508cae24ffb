"""People for the tests: users of any role (and customer) with API tokens, made through the
same service functions the API calls."""

from __future__ import annotations

import secrets

from sqlalchemy.engine import Engine
from sqlmodel import Session

from gateway.accounts import api_tokens, customers
from gateway.accounts.models import Customer, User
from gateway.accounts.passwords import hash_password
from gateway.accounts.principal import Actor, Principal, PrincipalKind
from gateway.db import utcnow
from gateway.models import Role

STAFF = Principal(PrincipalKind.legacy_token, Actor("tests"), role=Role.admin)


def make_customer(engine: Engine, name: str) -> Customer:
    with Session(engine, expire_on_commit=False) as session:
        return customers.create(session, STAFF, name)


def make_user(
    engine: Engine,
    role: Role,
    customer_id: str | None = None,
    password: str | None = None,
    email: str | None = None,
) -> User:
    with Session(engine, expire_on_commit=False) as session:
        user = User(
            id="usr-" + secrets.token_hex(5),
            email=email or f"{role.value}-{secrets.token_hex(3)}@tests.example.com",
            role=role,
            customer_id=customer_id,
            password_hash=hash_password(password) if password else None,
            created_at=utcnow(),
            created_by="tests",
        )
        session.add(user)
        session.commit()
        return user


def token_of(engine: Engine, user: User, role: Role | None = None) -> str:
    who = Principal(
        PrincipalKind.session,
        Actor(user.email, user_id=user.id),
        role=Role(user.role),
        user_id=user.id,
        email=user.email,
        customer_id=user.customer_id,
    )
    with Session(engine, expire_on_commit=False) as session:
        issued = api_tokens.create_for_user(
            session, who, name="tests", role=role, ttl_seconds=3600, max_ttl_seconds=86400
        )
    return issued.token


def user_token(engine: Engine, role: Role, customer_id: str | None = None) -> str:
    """A new user of `role` (of `customer_id`) and an API token of theirs."""
    return token_of(engine, make_user(engine, role, customer_id))
