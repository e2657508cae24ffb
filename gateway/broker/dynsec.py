"""Device credentials in Mosquitto's dynamic-security plugin.

The broker, not the gateway, enforces who may publish and read what: each device gets a client
(username = client id = device id, its own random password) bound to a role ``device-<id>`` whose
ACLs allow exactly its own telemetry/status/reply publishes and its own cmd subscription. The
gateway's identity gets a role with just what the gateway does (see `gateway_acls`).

Two ways to change that state, and the module has both:

* before the broker starts, `prepare_config_file` writes/updates the plugin's JSON file directly
  (admin client and role, default ACLs), because there is no broker to talk to yet;
* while it runs, `DynsecAdmin` speaks the plugin's control API over MQTT, which also kicks a
  deleted client off at once, something editing the file can never do.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.broker.permissions import device_topics
from gateway.errors import BrokerError, BrokerRefused, BrokerUnavailable, DeviceExistsError
from provisioning.files import write_private
from provisioning.mqtt import (
    MqttEndpoint,
    make_client,
    start_client,
    stop_client,
    unique_client_id,
)
from provisioning.wire import (
    DEVICE_PUBLISHES,
    DEVICE_RECEIVES,
    Topics,
    is_device_id,
    validate_device_id,
    validate_topic_prefix,
)

logger = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"

GATEWAY_USERNAME = "edgefleet_gateway"
"""The gateway's own MQTT user. The underscore keeps it out of the device id space."""
GATEWAY_ROLE = "edgefleet_gateway"
DEVICE_ROLE_PREFIX = "device-"


# Mosquitto's dynsec plugin hashes with PBKDF2-HMAC-SHA512 and reads back exactly 12 bytes of salt.
_SALT_BYTES = 12
_PBKDF2_ITERATIONS = 101  # Mosquitto's own default; the passwords we set are 256-bit random.

DEFAULT_ACL_ACCESS = {
    # Deny by default, receiving included: every allowed flow is spelled out in a role.
    "publishClientSend": False,
    "publishClientReceive": False,
    "subscribe": False,
    "unsubscribe": True,
}


def generate_password() -> str:
    """A fresh random broker password (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def device_role(device_id: str) -> str:
    return DEVICE_ROLE_PREFIX + validate_device_id(device_id)


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}


def device_acls(topic_prefix: str, device_id: str) -> list[dict[str, Any]]:
    """Exactly what one device may do: publish its own telemetry/status/reply, read its own cmd."""
    topics = device_topics(validate_topic_prefix(topic_prefix), validate_device_id(device_id))
    acls = [_acl("publishClientSend", topic) for topic in topics["publish"]]
    for topic in topics["subscribe"]:
        acls.append(_acl("subscribeLiteral", topic))
        acls.append(_acl("publishClientReceive", topic))
    return acls


def gateway_acls(topic_prefix: str) -> list[dict[str, Any]]:
    """What the gateway's identity may do.

    Manage dynsec; read device output through shared subscriptions (any group, so replicas and
    worker processes can choose); read retained statuses with a plain subscription (retained
    messages are not sent to shared subscriptions); send commands; clear a revoked device's
    retained status.
    """
    topics = Topics(validate_topic_prefix(topic_prefix))
    acls = [
        _acl("publishClientSend", CONTROL_TOPIC),
        _acl("subscribeLiteral", RESPONSE_TOPIC),
        _acl("publishClientReceive", RESPONSE_TOPIC),
    ]
    for leaf in DEVICE_PUBLISHES:
        acls.append(_acl("subscribePattern", topics.shared(leaf, group="+")))
        acls.append(_acl("publishClientReceive", topics.all_of(leaf)))
    acls.append(_acl("subscribePattern", topics.all_of("status")))
    acls.append(_acl("publishClientSend", topics.all_of(DEVICE_RECEIVES)))
    acls.append(_acl("publishClientSend", topics.all_of("status")))
    return acls


# -- the plugin's JSON file, edited only while the broker is stopped ---------------------------


def _hash_password(password: str, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS)


def _client_password_matches(client: dict[str, Any], password: str) -> bool:
    try:
        salt = base64.b64decode(client["salt"])
        stored = base64.b64decode(client["password"])
        iterations = int(client["iterations"])
    except (KeyError, ValueError, TypeError):
        return False
    computed = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return hmac.compare_digest(computed, stored)


def prepare_config_file(path: Path, admin_password: str, topic_prefix: str) -> None:
    """Create or update the dynsec JSON file so the gateway identity works with `admin_password`.

    Runs before Mosquitto starts. Devices and any other clients/roles in the file are kept; the
    gateway's role is rewritten for the current topic prefix, its password hash refreshed if it
    does not match, and the default ACL access set to deny.
    """
    acls = gateway_acls(topic_prefix)
    if path.exists():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise BrokerError(
                f"cannot read the broker's dynamic-security file {path}: {exc}; restore it from "
                f"a backup, or move it away to start with no device credentials"
            ) from exc
        if not isinstance(config, dict):
            raise BrokerError(f"{path} is not a dynamic-security JSON object; move it away")
    else:
        config = {}
    config["defaultACLAccess"] = dict(DEFAULT_ACL_ACCESS)
    clients: list[dict[str, Any]] = config.setdefault("clients", [])
    roles: list[dict[str, Any]] = config.setdefault("roles", [])
    config.setdefault("groups", [])

    roles[:] = [role for role in roles if role.get("rolename") != GATEWAY_ROLE]
    roles.append({"rolename": GATEWAY_ROLE, "textname": "edgefleet gateway", "acls": acls})

    admin = next((c for c in clients if c.get("username") == GATEWAY_USERNAME), None)
    if admin is None:
        admin = {"username": GATEWAY_USERNAME, "textname": "edgefleet gateway"}
        clients.append(admin)
    if not _client_password_matches(admin, admin_password):
        salt = secrets.token_bytes(_SALT_BYTES)
        admin["salt"] = base64.b64encode(salt).decode()
        admin["password"] = base64.b64encode(_hash_password(admin_password, salt)).decode()
        admin["iterations"] = _PBKDF2_ITERATIONS
    admin.pop("clientid", None)
    admin.pop("disabled", None)
    admin["roles"] = [{"rolename": GATEWAY_ROLE}]
    write_private(path, json.dumps(config, indent=2))


# -- the control API, while the broker runs ------------------------------------------------------


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    response: dict[str, Any] | None = None
    error: str | None = None


class DynsecAdmin:
    """Manages device credentials through Mosquitto's dynamic-security control API over MQTT.

    Uses paho-mqtt 2 with MQTT v5: each command goes to ``$CONTROL/dynamic-security/v1`` with a
    unique ``correlationData``, and the call waits for the matching entry on ``.../response``
    (every admin connection sees every response; the correlation picks ours). Thread-safe: many
    request threads may call it at once. paho reconnects by itself after a broker restart; a call
    made while disconnected waits up to `timeout` for the connection and then raises BrokerError.
    """

    def __init__(
        self,
        endpoint: MqttEndpoint,
        topic_prefix: str = "fleet",
        client_id: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._endpoint = endpoint
        self._prefix = validate_topic_prefix(topic_prefix)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._ready = threading.Event()
        self._fatal: str | None = None
        self._started = False
        self._client = make_client(
            endpoint,
            client_id or unique_client_id("dynsec"),
            name="dynsec admin",
            on_connected=self._subscribe,
            on_refused=self._refused,
            max_reconnect_delay=4,
        )
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # lifecycle

    def connect(self) -> None:
        """Connect and wait until the response topic is subscribed; BrokerError if that fails."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self._fatal = None
        start_client(self._client, self._endpoint, keepalive=30)
        deadline = time.monotonic() + self._timeout
        while not self._ready.wait(0.05):
            if self._fatal is not None or time.monotonic() >= deadline:
                reason = self._fatal or (
                    f"no connection within {self._timeout:.1f}s (is the broker running?)"
                )
                self.close()
                failure = BrokerRefused if self._fatal is not None else BrokerUnavailable
                raise failure(
                    f"cannot connect to the broker at {self._endpoint.url} as "
                    f"{self._endpoint.username!r} for dynamic-security: {reason}"
                )

    def close(self) -> None:
        with self._lock:
            if not self._started:
                return
            self._started = False
            pending = list(self._pending.values())
            self._ready.clear()
        for waiter in pending:
            waiter.error = "the dynamic-security admin connection was closed"
            waiter.done.set()
        stop_client(self._client)

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    # paho callbacks (network thread: never block here)

    def _refused(self, reason_code: ReasonCode) -> None:
        self._fatal = f"the broker refused the connection ({reason_code})"

    def _subscribe(self, client: mqtt.Client, _flags: mqtt.ConnectFlags) -> None:
        self._fatal = None
        client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if any(code.is_failure for code in reason_codes):
            self._fatal = (
                f"subscribing to {RESPONSE_TOPIC} was refused ({reason_codes[0]}); "
                f"the user lacks the gateway role"
            )
            logger.error("dynsec admin: %s", self._fatal)
            return
        logger.debug("dynsec admin connected to %s", self._endpoint.url)
        self._ready.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._ready.is_set():
            logger.info("dynsec admin lost the broker (%s); reconnecting", reason_code)
        self._ready.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(message.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            logger.warning("dynsec admin: unreadable response %r", message.payload[:200])
            return
        with self._lock:
            for response in responses:
                if not isinstance(response, dict):
                    continue
                waiter = self._pending.get(str(response.get("correlationData")))
                if waiter is not None:
                    waiter.response = response
                    waiter.done.set()

    # commands

    def _command(self, command: str, **arguments: Any) -> dict[str, Any]:
        """Send one command and return its response entry (which may carry an "error")."""
        correlation = uuid.uuid4().hex
        waiter = _Pending()
        with self._lock:
            if not self._started:
                raise BrokerUnavailable("DynsecAdmin is not connected; call connect() first")
            self._pending[correlation] = waiter
        deadline = time.monotonic() + self._timeout
        try:
            if not self._ready.wait(self._timeout):
                raise BrokerUnavailable(
                    f"dynamic-security {command}: not connected to the broker at "
                    f"{self._endpoint.url} for {self._timeout:.1f}s"
                    + (f" ({self._fatal})" if self._fatal else "; is it running?")
                )
            payload = json.dumps(
                {"commands": [{"command": command, "correlationData": correlation, **arguments}]}
            )
            info = self._client.publish(CONTROL_TOPIC, payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise BrokerUnavailable(
                    f"dynamic-security {command}: publishing failed ({mqtt.error_string(info.rc)})"
                )
            if not waiter.done.wait(max(0.0, deadline - time.monotonic())):
                raise BrokerUnavailable(
                    f"dynamic-security {command}: no answer from the broker at "
                    f"{self._endpoint.url} within {self._timeout:.1f}s; the command may or may "
                    f"not have been applied"
                )
        finally:
            with self._lock:
                self._pending.pop(correlation, None)
        if waiter.error is not None:
            raise BrokerUnavailable(f"dynamic-security {command}: {waiter.error}")
        assert waiter.response is not None
        return waiter.response

    def _checked(self, command: str, allowed_errors: Iterable[str] = (), **arguments: Any) -> Any:
        response = self._command(command, **arguments)
        error = response.get("error")
        if error and error not in allowed_errors:
            raise BrokerRefused(f"dynamic-security {command} was refused: {error}")
        return response.get("data")

    def add_device(self, device_id: str, password: str) -> None:
        """Give `device_id` a broker credential: role ``device-<id>`` and a client bound to it.

        The client's username and client id are both the device id. Raises DeviceExistsError when
        the device already has a credential (remove it first to rotate the password).
        """
        role = device_role(device_id)
        if not password:
            raise ValueError("a device's broker password must not be empty")
        existing = self._command("getClient", username=device_id)
        if not existing.get("error"):
            raise DeviceExistsError(
                f"device {device_id!r} already has a broker credential; remove it first "
                f"(revoke the device) to issue a new one"
            )
        # A role left over from an interrupted add is replaced, so the ACLs are exactly ours.
        self._checked("deleteRole", allowed_errors=("Role not found",), rolename=role)
        self._checked(
            "createRole",
            rolename=role,
            textname=f"edgefleet device {device_id}",
            acls=device_acls(self._prefix, device_id),
        )
        response = self._command(
            "createClient",
            username=device_id,
            password=password,
            clientid=device_id,
            textname=f"edgefleet device {device_id}",
            roles=[{"rolename": role, "priority": 0}],
        )
        error = response.get("error")
        if error == "Client already exists":
            raise DeviceExistsError(f"device {device_id!r} already has a broker credential")
        if error:
            raise BrokerRefused(f"dynamic-security createClient for {device_id!r} failed: {error}")
        logger.info("broker credential created for device %s", device_id)

    def remove_device(self, device_id: str, clear_retained_status: bool = True) -> None:
        """Delete the device's client (the broker disconnects it at once) and its role.

        No error if it is already gone. With `clear_retained_status`, also removes the device's
        retained status (an empty retained publish on ``{prefix}/{id}/status``): a revoked device
        is kicked without its Last Will, so its last "online" would otherwise stay forever.
        """
        validate_device_id(device_id)
        self._checked("deleteClient", allowed_errors=("Client not found",), username=device_id)
        self._checked(
            "deleteRole", allowed_errors=("Role not found",), rolename=device_role(device_id)
        )
        if clear_retained_status:
            info = self._client.publish(Topics(self._prefix).status(device_id), b"", 1, True)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise BrokerUnavailable(
                    f"could not clear the retained status of {device_id!r}: "
                    f"{mqtt.error_string(info.rc)}"
                )
        logger.info("broker credential removed for device %s", device_id)

    def list_devices(self) -> list[str]:
        """Device ids that have a broker credential (clients bound to their device role)."""
        data = self._checked("listClients", verbose=True, count=-1, offset=0)
        devices = []
        for client in (data or {}).get("clients", []):
            username = client.get("username", "")
            roles = {role.get("rolename") for role in client.get("roles", [])}
            if is_device_id(username) and DEVICE_ROLE_PREFIX + username in roles:
                devices.append(username)
        return sorted(devices)
