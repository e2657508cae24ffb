"""Logging in and out: what the API's auth routes and the console's login form both call."""

from __future__ import annotations

from sqlmodel import Session

from gateway.accounts import api_tokens, sessions, users
from gateway.accounts.models import User
from gateway.accounts.principal import Actor, Principal, PrincipalKind, actor_label
from gateway.db import utcnow
from gateway.registry import audit
from gateway.registry.models import ApiToken, Role
from gateway.settings import GatewaySettings


def _as_principal(user: User) -> Principal:
    return Principal(
        PrincipalKind.session,
        Actor(actor_label(user.email, user.id), user_id=user.id),
        role=Role(user.role),
        user_id=user.id,
        email=user.email,
        customer_id=user.customer_id,
    )


def open_session(
    session: Session,
    settings: GatewaySettings,
    user: User,
    *,
    method: str,
    address: str,
    user_agent: str,
    previous_secret: str | None,
) -> sessions.Started:
    """A fresh browser session for a user who just proved who they are (the old one ends)."""
    started = sessions.start(
        session,
        user,
        settings,
        address=address,
        user_agent=user_agent,
        method=method,
        previous_secret=previous_secret,
    )
    user.last_login_at = utcnow()
    session.add(user)
    actor = _as_principal(user).actor
    audit.record(
        session,
        actor,
        "auth.login",
        user.id,
        customer_id=user.customer_id,
        method=method,
        address=address,
    )
    session.commit()
    return started


def password_login(
    session: Session,
    settings: GatewaySettings,
    *,
    email: str,
    password: str,
    address: str,
    user_agent: str,
    previous_secret: str | None,
) -> tuple[sessions.Started, User]:
    user = users.check_password(session, settings, email=email, password=password, address=address)
    started = open_session(
        session,
        settings,
        user,
        method="password",
        address=address,
        user_agent=user_agent,
        previous_secret=previous_secret,
    )
    return started, user


def token_login(
    session: Session,
    settings: GatewaySettings,
    *,
    email: str,
    password: str,
    address: str,
    name: str,
    ttl_seconds: int | None,
) -> api_tokens.Issued:
    """Email and password for a person's API token (what `edgefleet login` keeps)."""
    user = users.check_password(session, settings, email=email, password=password, address=address)
    who = _as_principal(user)
    audit.record(
        session,
        who.actor,
        "auth.login",
        user.id,
        customer_id=user.customer_id,
        method="token",
        address=address,
    )
    return api_tokens.create_for_user(
        session,
        who,
        name=name,
        role=None,
        ttl_seconds=ttl_seconds,
        max_ttl_seconds=settings.api_token_max_ttl,
    )


def logout(session: Session, who: Principal, cookie_secret: str | None) -> ApiToken | None:
    """End the caller's browser session, or revoke the API token it called with."""
    if who.kind is PrincipalKind.session and cookie_secret:
        sessions.end(session, cookie_secret)
        audit.record(
            session, who.actor, "auth.logout", who.user_id or "", customer_id=who.customer_id
        )
        session.commit()
        return None
    if who.token_id and who.kind is PrincipalKind.user_token:
        return api_tokens.revoke(session, who, who.token_id)
    return None
