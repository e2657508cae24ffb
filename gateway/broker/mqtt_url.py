"""The external broker's URL (``--mqtt-url mqtts://user:pass@host:8883``) as an `MqttEndpoint`.

Every MQTT client of the gateway (ingest, commands, replies, status, dynsec admin) connects
through that one endpoint (`provisioning.mqtt`), so they agree on TLS and credentials.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from provisioning.mqtt import MqttEndpoint

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


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
