"""Gateway configuration: flags override EDGEFLEET_* environment variables override defaults.

Each setting is declared once, here. A setting marked with `Flag` is also an option of
`edgefleet gateway run` (in the order of the fields); its description is the option's help,
where ``{default}`` shows the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from provisioning.wire import DEFAULT_TOPIC_PREFIX


@dataclass(frozen=True)
class Flag:
    """This setting is an option of `edgefleet gateway run` (see `edgefleet.cmd_gateway`)."""

    name: str | None = None
    """The option, e.g. ``--db``; default: ``--`` and the field's name with dashes."""
    metavar: str | None = None
    group: str | None = None
    """The title of the options group it is listed under (default: the command's options)."""
    exclusive: str | None = None
    """Options with the same word here exclude each other."""
    duration: bool = False
    """Seconds, given as 90s, 15m, 12h or 30d (and its default shown that way)."""


TUNNELS = "support tunnels (the hub runs on one replica only)"
LOAD = "load (beyond these the gateway answers 503 with Retry-After; more in EDGEFLEET_HTTP_*)"


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", extra="ignore")

    # The data directory holds the SQLite database, the broker's files, the CA and the key.
    data_dir: Annotated[Path, Flag(metavar="DIR")] = Field(
        default=Path("edgefleet-data"), description="gateway data directory (default ./{default})"
    )
    db_url: Annotated[str | None, Flag(name="--db", metavar="URL")] = Field(
        default=None,
        description="database URL, e.g. postgresql://user@host/db (default: SQLite in the data "
        "directory)",
    )
    http: Annotated[str, Flag(metavar="HOST:PORT")] = Field(
        default="0.0.0.0:8080",
        description="where the HTTP API listens (default {default}; $EDGEFLEET_HTTP)",
    )
    mqtt_port: Annotated[int, Flag(metavar="PORT", exclusive="broker")] = Field(
        default=8883, description="port of the embedded Mosquitto, TLS (default {default})"
    )
    mqtt_url: Annotated[str | None, Flag(metavar="URL", exclusive="broker")] = Field(
        default=None,
        description="use an external broker instead (mqtts://user:pass@host:port)",
    )
    broker_kind: Annotated[Literal["mosquitto", "emqx"], Flag()] = Field(
        default="mosquitto",
        description="how machine credentials reach the broker: mosquitto (dynamic security, "
        "default) or emqx (EMQX asks this gateway's HTTP hooks; needs --mqtt-url)",
    )
    mqtt_ca_file: Annotated[Path | None, Flag(metavar="PEM")] = Field(
        default=None, description="CA of the external broker, handed to machines at enrollment"
    )
    # Default: the host machines enrolled through.
    public_host: Annotated[str | None, Flag(metavar="HOST")] = Field(
        default=None,
        description="name machines use to reach this host (put in the broker certificate)",
    )
    topic_prefix: Annotated[str, Flag(metavar="PREFIX")] = Field(
        default=DEFAULT_TOPIC_PREFIX, description="MQTT topic prefix (default {default})"
    )
    # An EC P-256 PEM; default: in the data directory.
    signing_key_file: Annotated[Path | None, Flag(name="--signing-key", metavar="PEM")] = Field(
        default=None, description="the command-signing key; replicas of a cluster share one"
    )
    # For the stable MQTT client ids of the telemetry ingest.
    replica_name: Annotated[str | None, Flag(metavar="NAME")] = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,48}$",
        description="this replica's name for its MQTT sessions (default: from host and data dir)",
    )
    telemetry_retention: Annotated[int, Flag(metavar="AGE", duration=True)] = Field(
        default=30 * 86400,
        gt=0,
        description="keep samples (raw and compacted) this long, e.g. 30d or 12h; whole chunk "
        "windows and days of chunks are dropped once older (default {default})",
    )
    telemetry_rollup_retention: Annotated[int, Flag(metavar="AGE", duration=True)] = Field(
        default=365 * 86400,
        gt=0,
        description="keep minute and hourly rollups this long, at least the samples' "
        "(default {default})",
    )
    telemetry_compact_after: Annotated[int, Flag(metavar="AGE", duration=True)] = Field(
        default=3600,
        gt=0,
        description="compact an hour of samples into encoded chunks and rollups once it is this "
        "old (default {default})",
    )
    telemetry_max_series_per_device: Annotated[int, Flag(metavar="N")] = Field(
        default=1000,
        ge=1,
        description="distinct metrics a device may send; samples of further ones are dropped, "
        "counted at /metrics and logged once per device (default {default})",
    )
    # Support tunnels. Exactly one replica runs the WireGuard hub (tunnel_hub); every replica
    # serves the tunnel API and reads the hub's public side from the database.
    tunnel_hub: Annotated[bool, Flag(group=TUNNELS)] = Field(
        default=False,
        description="run the WireGuard tunnel hub on this replica (needs root or CAP_NET_ADMIN)",
    )
    tunnel_endpoint: Annotated[str | None, Flag(metavar="HOST:PORT", group=TUNNELS)] = Field(
        default=None,
        description="public UDP address machines and engineers dial to reach the hub",
    )
    tunnel_listen_port: Annotated[int, Flag(metavar="PORT", group=TUNNELS)] = Field(
        default=51820, gt=0, lt=65536, description="hub UDP port (default {default})"
    )
    tunnel_interface: Annotated[str, Flag(metavar="NAME", group=TUNNELS)] = Field(
        default="efhub0",
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$",
        description="hub interface name (default {default})",
    )
    # One /32 per peer.
    tunnel_network: Annotated[str, Flag(metavar="CIDR", group=TUNNELS)] = Field(
        default="10.213.0.0/16", description="tunnel address pool (default {default})"
    )
    tunnel_mtu: Annotated[int, Flag(metavar="MTU", group=TUNNELS)] = Field(
        default=1280, ge=576, le=65535, description="default {default}"
    )
    tunnel_max_ttl: Annotated[int, Flag(metavar="DURATION", group=TUNNELS, duration=True)] = Field(
        default=12 * 3600,
        gt=0,
        description="longest tunnel an operator may open, e.g. 4h (default {default})",
    )
    tunnel_open_timeout: float = Field(
        default=20.0, gt=0, le=600, description="How long an open waits for the machine."
    )
    tunnel_quarantine: float = Field(
        default=600.0, ge=0, description="Seconds before a released address is handed out again."
    )
    broker_hook_token: str | None = Field(
        default=None,
        description="If set, the EMQX hooks require 'Authorization: Bearer <token>' "
        "(put the same header in emqx.conf).",
    )
    emqx_api_url: str | None = Field(default=None, description="EMQX REST API, to kick revoked")
    emqx_api_key: str | None = None
    emqx_api_secret: str | None = None
    max_request_bytes: int = 64 * 1024
    # Load shedding (gateway/api/load_shedding.py) and the HTTP server's own limits.
    http_max_in_flight: Annotated[int, Flag(metavar="N", group=LOAD)] = Field(
        default=8,
        ge=1,
        le=1000,
        description="API requests run at once; the API's database pool is sized to match.",
    )
    http_max_waiting: int = Field(
        default=512, ge=0, description="Requests that may wait for a place; the rest get 503."
    )
    http_queue_timeout: float = Field(
        default=5.0, ge=0, description="Seconds a request waits for a place before its 503."
    )
    http_max_connections: Annotated[int, Flag(metavar="N", group=LOAD)] = Field(
        default=2000, ge=1, description="Open HTTP connections; more are closed at once."
    )
    http_keep_alive: int = Field(
        default=15,
        gt=0,
        description="Seconds an idle kept-alive connection stays open (a busy client's next "
        "request must not meet a connection closing under it).",
    )
    http_header_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a client has to send a request's head."
    )
    http_body_timeout: float = Field(
        default=120.0, gt=0, description="Seconds a client has to send a request's whole body."
    )
    http_read_timeout: float = Field(
        default=15.0, gt=0, description="Seconds a body may pause between two chunks."
    )
    http_yield_lag: float = Field(
        default=0.05,
        gt=0,
        description="While the telemetry ingest trails the machines by more than this many "
        "seconds, new API requests wait (then 503): device data comes first.",
    )
    enroll_failures_per_minute: int = Field(
        default=10,
        ge=1,
        description="Failed enrollments one client address may make per minute; then 429.",
    )
    provisioning_token_max_ttl: int = 30 * 24 * 3600
    status_sync_interval: float = 30.0
    rollout_interval: float = Field(
        default=0.5, gt=0, description="How often the rollout scheduler advances deployments."
    )
    max_module_bytes: int = Field(
        default=64 * 1024 * 1024, description="Largest node module tarball the cache accepts."
    )
    max_release_request_bytes: int = Field(
        default=12 * 1024 * 1024,
        description="Largest release upload (a 5 MB flows file, JSON-escaped, plus modules).",
    )
    telemetry_retention_interval: float = 300.0
    telemetry_compact_interval: float = Field(
        default=60.0, gt=0, description="Seconds between two passes of the compaction."
    )
    telemetry_compact_pace: float = Field(
        default=3.0,
        ge=0,
        description="The compaction rests this many times as long as each step took, so it "
        "takes at most 1/(1+pace) of a core from the ingest (0: full speed).",
    )
    telemetry_session_expiry: int = Field(
        default=7 * 86400,
        gt=0,
        description="Seconds the broker keeps a stopped replica's telemetry session (its share "
        "of the stream waits there for it).",
    )
    telemetry_receive_maximum: int = Field(
        default=10_000,
        ge=1,
        le=65535,
        description="Unacknowledged telemetry messages the broker may send this replica at once.",
    )
    telemetry_leave_on_stop: bool = Field(
        default=False,
        description="On a clean stop, leave the telemetry group for good (the broker then deals "
        "this replica's share to the others) instead of keeping its session for a restart.",
    )

    # People (gateway.accounts): browser sessions, login throttling, single sign-on, tokens.
    session_idle_timeout: int = Field(
        default=2 * 3600, gt=0, description="A browser session ends after this many idle seconds."
    )
    session_max_age: int = Field(
        default=12 * 3600, gt=0, description="A browser session ends this long after login."
    )
    session_cookie_secure: bool = Field(
        default=True,
        description="Mark the session cookie Secure (sent over HTTPS only; browsers also send "
        "it to http://localhost). Turn off only for a plain-HTTP test gateway.",
    )
    login_account_failures: int = Field(
        default=5, ge=1, description="Failed logins per account in a window before it waits."
    )
    login_address_failures: int = Field(
        default=30, ge=1, description="Failed logins per client address in a window."
    )
    login_window: int = Field(
        default=900,
        gt=0,
        description="Seconds over which failed logins are counted; a "
        "throttled account or address waits until its window ends.",
    )
    api_token_max_ttl: int = Field(
        default=366 * 86400, gt=0, description="Longest lifetime of a person's API token."
    )
    oidc_issuer: str | None = Field(
        default=None, description="OpenID Connect issuer URL for single sign-on (off if unset)."
    )
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = None
    oidc_redirect_url: str | None = Field(
        default=None,
        description="Where the provider sends browsers back; default: this gateway's "
        "/api/v1/auth/oidc/callback as the request reached it.",
    )

    @field_validator("http")
    @classmethod
    def _check_http(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT, e.g. 0.0.0.0:8080, not {value!r}")
        return value

    @field_validator(
        "telemetry_retention",
        "telemetry_rollup_retention",
        "telemetry_compact_after",
        mode="before",
    )
    @classmethod
    def _parse_retention(cls, value: object) -> object:
        """'30d', '12h', '90m', '45s' or plain seconds."""
        if isinstance(value, str):
            text = value.strip().lower()
            units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
            if text[-1:] in units and text[:-1].isdigit():
                return int(text[:-1]) * units[text[-1]]
            if not text.isdigit():
                raise ValueError(f"expected a duration such as 30d, 12h or 3600, not {value!r}")
        return value

    @model_validator(mode="after")
    def _check_telemetry_ages(self) -> GatewaySettings:
        if self.telemetry_rollup_retention < self.telemetry_retention:
            raise ValueError(
                f"telemetry_rollup_retention ({self.telemetry_rollup_retention}s) must be at "
                f"least telemetry_retention ({self.telemetry_retention}s): rollups answer long "
                "ranges where samples still exist"
            )
        return self

    @field_validator("tunnel_endpoint")
    @classmethod
    def _check_tunnel_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected HOST:PORT, e.g. hub.example.com:51820, not {value!r}")
        return value

    @property
    def http_host(self) -> str:
        return self.http.rpartition(":")[0].strip("[]")

    @property
    def http_port(self) -> int:
        return int(self.http.rpartition(":")[2])

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL; a plain postgresql:// URL gets the psycopg 3 driver."""
        url = self.db_url or f"sqlite:///{(self.data_dir / 'edgefleet.db').resolve()}"
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        return url

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def signing_key_path(self) -> Path:
        return self.signing_key_file or self.data_dir / "signing-key.pem"
