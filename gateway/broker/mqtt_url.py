"""Where and how to reach an MQTT broker, from one URL such as ``mqtts://user:pass@host:8883``.

One value object for all of the gateway's MQTT clients (ingest, commands, dynsec admin) so that
they agree on TLS and credentials, and one place that turns it into paho client settings.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class MqttEndpoint:
    """A broker address with the credential and trust anchor to use for it."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None

    @property
    def url(self) -> str:
        """The URL without the password, safe for logs."""
        scheme = "mqtts" if self.tls else "mqtt"
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that verifies the broker (against `ca_file` if given)."""
        context = ssl.create_default_context(
            cafile=str(self.ca_file) if self.ca_file is not None else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def configure(self, client: mqtt.Client) -> None:
        """Apply credentials and TLS to a paho client before it connects."""
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set_context(self.ssl_context())


def parse_mqtt_url(url: str, ca_file: Path | None = None) -> MqttEndpoint:
    """Parse ``mqtt://[user[:pass]@]host[:port]`` or ``mqtts://...``.

    User and password may be percent-encoded. `ca_file` is the CA to verify a TLS broker with
    (None means the system's trust store).
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("MQTT URL is empty; expected e.g. mqtts://user:password@broker:8883")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"MQTT URL {_redact(url)!r} is malformed: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(
            f"MQTT URL {_redact(url)!r} has scheme {parts.scheme!r}; use mqtt:// (plain) "
            f"or mqtts:// (TLS)"
        )
    if not parts.hostname:
        raise ValueError(f"MQTT URL {_redact(url)!r} has no host; expected {scheme}://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"MQTT URL {_redact(url)!r} has a path, query or fragment; an MQTT URL is only "
            f"{scheme}://[user:password@]host[:port]"
        )
    if port == 0:
        raise ValueError(f"MQTT URL {_redact(url)!r} has port 0; give a real port")
    return MqttEndpoint(
        host=parts.hostname,
        port=port if port is not None else DEFAULT_PORTS[scheme],
        tls=scheme == "mqtts",
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
        ca_file=ca_file,
    )


def _redact(url: str) -> str:
    """The URL with any password replaced, so error messages never leak it."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, hostpart = rest.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostpart}" if ":" in userinfo else url
