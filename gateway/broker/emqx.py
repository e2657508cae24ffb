"""EMQX as the fleet's broker: the gateway answers EMQX's HTTP authentication/authorization hooks.

Why hooks rather than EMQX's user-management API: the registry stays the one source of truth (a
revoked device is refused at its next CONNECT or publish without a second copy to keep in step),
and any gateway replica can answer. The device's broker password is kept in its registry row as a
SHA-256 hash (it is a random 256-bit secret), written in the enrollment's own transaction.
EMQX 5.8 also takes the device's ACL in the authentication answer, so publishes are not a round
trip each; the authorization hook answers the same rule for older setups and cache misses.

Revocation also kicks the live session through EMQX's REST API (``DELETE /api/v5/clients/{id}``)
so the device is out at once rather than at its next reconnect or authorization-cache expiry.

EMQX cannot run on the development machine, so these are tested against the HTTP contract EMQX
documents (docs.emqx.com: "Use HTTP Service" for authentication and authorization).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from gateway.broker.permissions import device_may, device_topics
from gateway.registry.models import Device, DeviceState
from provisioning.secrets import hash_secret, same_secret

log = logging.getLogger(__name__)


class AuthnRequest(BaseModel):
    """What EMQX posts to ``/api/v1/broker/authn`` (body template in emqx.conf)."""

    model_config = ConfigDict(extra="ignore")
    clientid: str
    username: str
    password: str = ""


class AclRule(BaseModel):
    permission: Literal["allow", "deny"]
    action: Literal["publish", "subscribe", "all"]
    topic: str


class AuthnResponse(BaseModel):
    result: Literal["allow", "deny", "ignore"]
    is_superuser: bool = False
    acl: list[AclRule] | None = None


class AuthzRequest(BaseModel):
    """What EMQX posts to ``/api/v1/broker/authz``."""

    model_config = ConfigDict(extra="ignore")
    clientid: str
    username: str
    topic: str
    action: str


class AuthzResponse(BaseModel):
    result: Literal["allow", "deny", "ignore"]


def authenticate(session: Session, request: AuthnRequest, prefix: str) -> AuthnResponse:
    """A device may connect with its own id as both username and client id, and its password."""
    deny = AuthnResponse(result="deny")
    if request.username != request.clientid:
        return deny
    device = session.get(Device, request.username)
    if device is None or device.state != DeviceState.active or not device.broker_password_hash:
        return deny
    if not same_secret(device.broker_password_hash, hash_secret(request.password)):
        return deny
    topics = device_topics(prefix, device.id)
    acl = [AclRule(permission="allow", action="publish", topic=t) for t in topics["publish"]]
    acl += [AclRule(permission="allow", action="subscribe", topic=t) for t in topics["subscribe"]]
    acl.append(AclRule(permission="deny", action="all", topic="#"))
    return AuthnResponse(result="allow", acl=acl)


def authorize(session: Session, request: AuthzRequest, prefix: str) -> AuthzResponse:
    if request.username != request.clientid:
        return AuthzResponse(result="deny")
    device = session.get(Device, request.username)
    if device is None or device.state != DeviceState.active:
        return AuthzResponse(result="deny")
    allowed = device_may(prefix, device.id, request.action, request.topic)
    return AuthzResponse(result="allow" if allowed else "deny")


@dataclass(frozen=True)
class EmqxApi:
    """EMQX's REST API (an API key made in its dashboard)."""

    url: str
    key: str
    secret: str

    def kick(self, client_id: str) -> None:
        response = httpx.delete(
            f"{self.url.rstrip('/')}/api/v5/clients/{client_id}",
            auth=(self.key, self.secret),
            timeout=5.0,
        )
        if response.status_code not in (204, 404):  # 404: not connected right now
            raise RuntimeError(f"EMQX refused to kick {client_id}: {response.status_code}")


class EmqxBrokerAdmin:
    """`BrokerAdmin` for EMQX. The credential lives in the registry row (the hooks read it), so
    adding is nothing more; removing kicks the live session through EMQX's API."""

    def __init__(self, engine: Engine, api: EmqxApi | None) -> None:
        self._engine = engine
        self._api = api

    def add_device(self, device_id: str, password: str) -> None:
        """Nothing to do: enrollment stores the password hash with the device."""

    def remove_device(self, device_id: str) -> None:
        if self._api is not None:
            self._api.kick(device_id)
        else:
            log.warning("no EMQX API configured: %s stays connected until it reconnects", device_id)

    def list_devices(self) -> list[str]:
        """Devices EMQX would let in: the active ones (revoked ones are refused by the hooks)."""
        with Session(self._engine) as session:
            query = select(Device.id).where(Device.state == DeviceState.active)
            return list(session.exec(query))
