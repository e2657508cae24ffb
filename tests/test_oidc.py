"""Single sign-on against a real OpenID Connect provider process: `oidc-provider-mock` (PyPI),
started on a free port. It signs real RS256 ID tokens, serves discovery and JWKS, and checks the
PKCE verifier; its only stand-in part is the login page, where a test posts the subject instead
of a person typing a password."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from fastapi.testclient import TestClient

from gateway.accounts.oidc import STATE_COOKIE
from gateway.accounts.sessions import COOKIE
from gateway.app import create_app
from gateway.registry.models import Role
from gateway.runtime import GatewayRuntime
from tests.support.accounts import make_user
from tests.support.waiting import free_port, wait_for


@pytest.fixture(scope="module")
def provider() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oidc_provider_mock",
            "--port",
            str(port),
            "--require-nonce",
            "true",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    issuer = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(issuer + "/.well-known/openid-configuration", timeout=1).is_success
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=30, interval=0.1, what="the OIDC provider")
        yield issuer
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _sso(client: TestClient, issuer: str, sub: str) -> httpx.Response:
    """Start SSO at the gateway, sign in at the provider as `sub`, come back."""
    start = client.get("/api/v1/auth/oidc/login?next=/fleet", follow_redirects=False)
    assert start.status_code == 302, start.text
    authorize = start.headers["location"]
    assert authorize.startswith(issuer)
    query = parse_qs(urlparse(authorize).query)
    assert query["code_challenge_method"] == ["S256"] and query["nonce"]
    answer = httpx.post(authorize, data={"sub": sub}, follow_redirects=False)
    assert answer.status_code == 302, answer.text
    back = urlparse(answer.headers["location"])
    return client.get(f"{back.path}?{back.query}", follow_redirects=False)


def test_sso_signs_in_an_existing_user_and_nobody_else(
    provider: str, runtime: GatewayRuntime
) -> None:
    runtime.settings.oidc_issuer = provider
    runtime.settings.oidc_client_id = "edgefleet"
    runtime.settings.oidc_client_secret = "s3cret"
    user = make_user(runtime.engine, Role.support, email="eng@example.com")
    with TestClient(create_app(runtime), base_url="https://testserver") as client:
        came_back = _sso(client, provider, "eng@example.com")
        assert came_back.status_code == 302 and came_back.headers["location"] == "/fleet"
        me = client.get("/api/v1/auth/me").json()
        assert me["user_id"] == user.id and me["kind"] == "session" and me["csrf_token"]

    with TestClient(create_app(runtime), base_url="https://testserver") as stranger:
        refused = _sso(stranger, provider, "nobody@example.com")
        assert refused.status_code == 403 and refused.json()["reason"] == "no_account"
        assert COOKIE not in stranger.cookies

    with TestClient(create_app(runtime), base_url="https://testserver") as forger:
        start = forger.get("/api/v1/auth/oidc/login", follow_redirects=False)
        answer = httpx.post(start.headers["location"], data={"sub": "eng@example.com"})
        back = urlparse(answer.headers["location"])
        forger.cookies.delete(STATE_COOKIE)  # another browser's callback: no state cookie
        csrf = forger.get(f"{back.path}?{back.query}", follow_redirects=False)
        assert csrf.status_code == 403 and csrf.json()["reason"] == "oidc_state_mismatch"
