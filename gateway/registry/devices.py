"""The device registry: enrollment, listing, revocation, and the checks on device JWTs."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import Session, col, select

from gateway.broker.admin import BrokerAdmin, DeviceBrokerInfo
from gateway.db import utcnow
from gateway.errors import Conflict, Invalid, NotFound, Unauthorized, Unavailable
from gateway.identity import GatewayIdentity
from gateway.registry import audit, ownership
from gateway.registry.models import Device, DeviceState, UsedJti
from gateway.registry.tokens import consume_provisioning_token
from provisioning import keys
from provisioning.jwt_rules import DeviceClaims, TokenRejected, verify_device_token
from provisioning.secrets import hash_secret, new_secret
from provisioning.wire import BrokerCredential, DeviceStatus, EnrollRequest, EnrollResponse

log = logging.getLogger(__name__)
_ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no look-alikes: people read these aloud


def new_device_id() -> str:
    return "dev-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


@dataclass(frozen=True)
class EnrollContext:
    identity: GatewayIdentity
    broker: BrokerAdmin
    broker_info: DeviceBrokerInfo
    topic_prefix: str


def enroll(session: Session, request: EnrollRequest, ctx: EnrollContext) -> EnrollResponse:
    """Register a machine. Either all of it happens (token use counted, device row, broker
    credential, audit event) or none of it does."""
    try:
        public_key = keys.load_public_key(request.public_key)
    except keys.InvalidKey as exc:
        raise Invalid("bad_public_key", str(exc)) from exc
    fingerprint = keys.fingerprint(public_key)
    token = consume_provisioning_token(session, request.token)
    taken = session.exec(select(Device).where(Device.key_fingerprint == fingerprint)).first()
    if taken is not None:
        raise Conflict(
            "key_already_enrolled",
            f"this public key is already enrolled as {taken.id}; a machine re-enrolling "
            "must make a new key pair (edgefleet agent enroll --force)",
        )
    device_id = new_device_id()
    password = new_secret()
    claim_code = None if token.customer_id else ownership.new_claim_code()
    device = Device(
        id=device_id,
        name=ownership.unique_name(
            session, request.name or device_id, token.customer_id, device_id
        ),
        customer_id=token.customer_id,
        claim_code_hash=ownership.claim_code_hash(claim_code) if claim_code else None,
        public_key=keys.public_key_pem(public_key),
        key_fingerprint=fingerprint,
        tags=dict(token.tags),
        enrolled_at=utcnow(),
        agent_version=request.agent_version or None,
        hostname=request.hostname or None,
        provisioning_token_id=token.id,
        broker_password_hash=hash_secret(password),
    )
    session.add(device)
    audit.record(
        session,
        f"token:{token.id}",
        "device.enroll",
        device.id,
        customer_id=token.customer_id,
        name=device.name,
        requested_name=request.name,
        tags=device.tags,
        key=fingerprint,
    )
    session.flush()
    try:
        ctx.broker.add_device(device.id, password)
    except Exception as exc:
        session.rollback()
        log.error("enrollment of %s failed at the broker: %s", device.id, exc)
        raise Unavailable(
            "broker_unavailable", f"the broker refused the new credential: {exc}"
        ) from exc
    try:
        session.commit()
    except Exception:
        _forget_credential(ctx.broker, device.id)
        raise
    info = ctx.broker_info
    return EnrollResponse(
        device_id=device.id,
        name=device.name,
        tags=device.tags,
        gateway_id=ctx.identity.gateway_id,
        gateway_public_key=ctx.identity.public_key_pem,
        topic_prefix=ctx.topic_prefix,
        broker=BrokerCredential(
            host=info.host,
            port=info.port,
            tls=info.tls,
            username=device.id,
            password=password,
            client_id=device.id,
            ca_cert=info.ca_pem,
        ),
        **({"claim_code": claim_code} if claim_code else {}),
    )


def _forget_credential(broker: BrokerAdmin, device_id: str) -> None:
    try:
        broker.remove_device(device_id)
    except Exception:
        log.exception(
            "could not remove the broker credential of %s after a failed enrollment; "
            "the credential sync will",
            device_id,
        )


def list_devices(session: Session, include_revoked: bool = False) -> list[Device]:
    query = select(Device).order_by(col(Device.enrolled_at))
    if not include_revoked:
        query = query.where(Device.state == DeviceState.active)
    return list(session.exec(query))


def get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound("unknown_device", f"no device {device_id!r}")
    return device


def revoke(session: Session, device_id: str, actor: str, broker: BrokerAdmin) -> Device:
    """Take a device out: its JWTs stop working at once (registry first), then its broker
    credential goes, which disconnects it. If the broker cannot be reached the device is still
    revoked and the credential sync removes the credential when the broker is back."""
    device = get_device(session, device_id)
    if device.state == DeviceState.revoked:
        return device
    device.state = DeviceState.revoked
    device.revoked_at = utcnow()
    device.online = False
    session.add(device)
    audit.record(session, actor, "device.revoke", device.id, name=device.name)
    session.commit()
    try:
        broker.remove_device(device.id)
    except Exception as exc:
        log.error(
            "device %s is revoked but its broker credential could not be removed yet: %s",
            device.id,
            exc,
        )
    return device


def sync_broker_credentials(session: Session, broker: BrokerAdmin) -> list[str]:
    """Remove broker credentials of devices that are revoked or unknown; returns the removed."""
    active = set(session.exec(select(Device.id).where(Device.state == DeviceState.active)))
    removed = []
    for device_id in broker.list_devices():
        if device_id not in active:
            broker.remove_device(device_id)
            removed.append(device_id)
    if removed:
        log.warning("removed stale broker credentials: %s", ", ".join(removed))
    return removed


def authenticate_device(session: Session, token: str, audience: str) -> Device:
    """Check a device JWT (signature with the device's registered key, audience, lifetime,
    expiry) and refuse a replayed jti; returns the active device."""
    found: dict[str, Device] = {}

    def key_for(device_id: str) -> ec.EllipticCurvePublicKey:
        device = session.get(Device, device_id)
        if device is None:
            raise TokenRejected("unknown_device", f"no device {device_id!r} is enrolled")
        if device.state != DeviceState.active:
            raise TokenRejected("device_revoked", f"device {device_id} has been revoked")
        found["device"] = device
        return keys.load_public_key(device.public_key)

    try:
        claims = verify_device_token(token, key_for, audience)
    except TokenRejected as exc:
        raise Unauthorized(exc.reason, str(exc)) from exc
    _claim_jti(session, claims)
    return found["device"]


def _claim_jti(session: Session, claims: DeviceClaims) -> None:
    """Record the jti; a second use of it is a replay. The primary key makes this hold across
    replicas sharing one database."""
    row = UsedJti(
        jti=claims.jti,
        device_id=claims.device_id,
        expires_at=datetime.fromtimestamp(claims.expires_at, UTC),
    )
    try:
        with session.begin_nested():
            session.add(row)
        session.commit()
    except sa.exc.IntegrityError as exc:
        session.rollback()
        raise Unauthorized("replayed", "this token has already been used (replay)") from exc


def purge_used_jtis(session: Session) -> int:
    table = UsedJti.__table__  # type: ignore[attr-defined]
    result = session.execute(sa.delete(table).where(table.c.expires_at < utcnow()))
    session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]


def record_status(session: Session, device_id: str, status: DeviceStatus) -> bool:
    """Store a status message; returns False for unknown or revoked devices (ignored)."""
    device = session.get(Device, device_id)
    if device is None or device.state != DeviceState.active:
        return False
    device.online = status.state == "online"
    device.last_seen = utcnow()
    if status.agent_version:
        device.agent_version = status.agent_version
    if status.node_red_version:
        device.node_red_version = status.node_red_version
    if status.state == "online":  # the Last Will says nothing about these
        device.node_red_up = status.node_red_up
        device.outbox_queued = status.outbox_queued
        device.outbox_dropped = status.outbox_dropped
    session.add(device)
    session.commit()
    return True
