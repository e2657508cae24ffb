"""People for the tests: users of any role (and customer) with API tokens, made through the
same service functions the API calls."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy.engine import Engine
from sqlmodel import Session

from gateway.accounts import api_tokens, customers
from gateway.accounts.models import Customer, User
from gateway.accounts.passwords import hash_password
from gateway.accounts.principal import Actor, Principal, PrincipalKind
from gateway.db import utcnow
from gateway.registry.models import Role
from tests.support import local_http

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


# ---- over HTTP, against a running gateway -----------------------------------------------------

TEST_PASSWORD = "correct horse battery staple"


def _ok(response: httpx.Response) -> Any:
    assert response.is_success, f"{response.request.url}: {response.status_code} {response.text}"
    return response.json()


def person_token(
    url: str,
    token: str,
    role: str,
    customer: str | None = None,
    email: str | None = None,
    post: Callable[..., httpx.Response] = local_http.post,
) -> dict[str, Any]:
    """Create a user of `role` with `token` (an admin's, or the bootstrap token for the first
    admin) and log them in for an API token: the made token's JSON (token, id, ...)."""
    email = email or f"{role}-{secrets.token_hex(3)}@tests.example.com"
    headers = {"Authorization": f"Bearer {token}"}
    body = {"email": email, "role": role, "customer": customer, "password": TEST_PASSWORD}
    _ok(post(f"{url}/api/v1/users", json=body, headers=headers))
    return login_token(url, email, post)


def login_token(
    url: str, email: str, post: Callable[..., httpx.Response] = local_http.post
) -> dict[str, Any]:
    """Log a test user in (TEST_PASSWORD) for an API token: the made token's JSON."""
    login = {"email": email, "password": TEST_PASSWORD, "name": "tests"}
    made: dict[str, Any] = _ok(post(f"{url}/api/v1/auth/token", json=login))
    return made
