"""OpenID Connect single sign-on (authorization code flow with PKCE), through authlib.

Configured by `oidc_issuer`, `oidc_client_id` and `oidc_client_secret`; the provider's endpoints
come from its discovery document. A login in progress (state, nonce, PKCE verifier) is a row in
`oidc_logins`, so the provider may send the browser back to any replica; the browser also holds
the state in a short-lived cookie, and the callback must match it (no login CSRF). The ID token
is checked with joserfc (authlib's JOSE library) against the provider's published keys: issuer,
audience, expiry, nonce.

SSO signs in existing users only: the first login links the provider's subject to the user whose
email the provider vouches for (`email_verified` not false); later logins find the user by
(issuer, subject). Nobody gets an account by signing in.
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlmodel import Session, col, select

from gateway.accounts.models import OidcLogin, User
from gateway.db import utcnow
from gateway.errors import Forbidden, Invalid, Unavailable
from gateway.settings import GatewaySettings

with warnings.catch_warnings():
    # authlib would rather use httpx2; the project uses httpx, which authlib still supports.
    # (authlib.deprecate sets an "always" filter for its warning at import: import it first.)
    import authlib.deprecate

    warnings.filterwarnings("ignore", category=authlib.deprecate.AuthlibDeprecationWarning)
    from authlib.integrations.httpx_client import OAuth2Client

STATE_COOKIE = "edgefleet_oidc_state"
LOGIN_TTL = timedelta(minutes=10)
_ALGORITHMS = ["RS256", "ES256", "PS256", "EdDSA"]


@dataclass(frozen=True)
class Identity:
    issuer: str
    subject: str
    email: str | None
    email_verified: bool | None


def enabled(settings: GatewaySettings) -> bool:
    return bool(settings.oidc_issuer and settings.oidc_client_id)


def _metadata(settings: GatewaySettings) -> dict[str, Any]:
    issuer = (settings.oidc_issuer or "").rstrip("/")
    url = issuer + "/.well-known/openid-configuration"
    try:
        response = httpx.get(url, timeout=10)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise Unavailable("oidc_unavailable", f"cannot read {url}: {exc}") from exc
    return data


def _client(settings: GatewaySettings, redirect_uri: str) -> OAuth2Client:
    return OAuth2Client(
        client_id=settings.oidc_client_id,
        client_secret=settings.oidc_client_secret,
        scope="openid email profile",
        redirect_uri=redirect_uri,
        code_challenge_method="S256",
        timeout=10,
    )


def safe_next(path: str | None) -> str:
    """Only a path on this gateway: never an open redirect to another site."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path[:500]


def begin(
    session: Session, settings: GatewaySettings, redirect_uri: str, next_path: str
) -> tuple[str, str]:
    """Record a login and give (the provider's authorization URL, the state for the cookie)."""
    if not enabled(settings):
        raise Invalid("oidc_off", "single sign-on is not configured on this gateway")
    meta = _metadata(settings)
    state = secrets.token_urlsafe(24)
    nonce = secrets.token_urlsafe(24)
    verifier = secrets.token_urlsafe(48)
    with _client(settings, redirect_uri) as client:
        url, _ = client.create_authorization_url(
            meta["authorization_endpoint"], state=state, nonce=nonce, code_verifier=verifier
        )
    session.add(
        OidcLogin(
            state=state,
            nonce=nonce,
            code_verifier=verifier,
            redirect_uri=redirect_uri,
            next_path=safe_next(next_path),
            created_at=utcnow(),
        )
    )
    session.commit()
    return str(url), state


def finish(
    session: Session, settings: GatewaySettings, *, state: str, code: str, cookie_state: str | None
) -> tuple[Identity, str]:
    """Check the callback, swap the code for tokens, verify the ID token; (who, next path)."""
    if not cookie_state or not secrets.compare_digest(cookie_state, state):
        raise Forbidden("oidc_state_mismatch", "this sign-on was not started in this browser")
    login = session.get(OidcLogin, state)
    if login is None or utcnow() - login.created_at > LOGIN_TTL:
        raise Forbidden("oidc_state_unknown", "this sign-on expired or was used; start again")
    session.delete(login)  # one use
    session.commit()
    meta = _metadata(settings)
    try:
        with _client(settings, login.redirect_uri) as client:
            token = client.fetch_token(
                meta["token_endpoint"], code=code, code_verifier=login.code_verifier
            )
        keys = KeySet.import_key_set(httpx.get(meta["jwks_uri"], timeout=10).json())
    except Exception as exc:  # the provider's answers are outside input: say what happened
        raise Unavailable("oidc_exchange_failed", f"the provider refused the code: {exc}") from exc
    id_token = token.get("id_token")
    if not isinstance(id_token, str):
        raise Forbidden("oidc_no_id_token", "the provider sent no ID token")
    try:
        decoded = jwt.decode(id_token, keys, algorithms=_ALGORITHMS)
        jwt.JWTClaimsRegistry(
            leeway=60,
            iss={"essential": True, "value": str(meta.get("issuer", settings.oidc_issuer))},
            aud={"essential": True, "value": str(settings.oidc_client_id)},
            sub={"essential": True},
            exp={"essential": True},
            nonce={"essential": True, "value": login.nonce},
        ).validate(decoded.claims)
    except (JoseError, ValueError) as exc:
        raise Forbidden("oidc_bad_id_token", f"the ID token does not check out: {exc}") from exc
    claims = decoded.claims
    email = claims.get("email")
    verified = claims.get("email_verified")
    return (
        Identity(
            str(claims["iss"]),
            str(claims["sub"]),
            str(email).lower() if email else None,
            bool(verified) if verified is not None else None,
        ),
        login.next_path,
    )


def user_for(session: Session, identity: Identity) -> User:
    """The existing, enabled user this identity signs in as (linked at the first login)."""
    user = session.exec(
        select(User).where(
            User.oidc_issuer == identity.issuer, User.oidc_subject == identity.subject
        )
    ).first()
    if user is None:
        if not identity.email or identity.email_verified is False:
            raise Forbidden("oidc_no_email", "the provider vouches for no email address")
        user = session.exec(
            select(User).where(User.email == identity.email, col(User.oidc_subject).is_(None))
        ).first()
        if user is None:
            raise Forbidden(
                "no_account",
                f"there is no user {identity.email} on this gateway; ask an admin to create one",
            )
        user.oidc_issuer = identity.issuer
        user.oidc_subject = identity.subject
        session.add(user)
    if user.disabled_at is not None:
        raise Forbidden("user_disabled", f"the user {user.email} is disabled")
    return user


def purge(session: Session) -> None:
    table = OidcLogin.__table__  # type: ignore[attr-defined]
    session.execute(table.delete().where(table.c.created_at < utcnow() - LOGIN_TTL))
    session.commit()
