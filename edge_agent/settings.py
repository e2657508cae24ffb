"""Agent configuration: flags override EDGEFLEET_AGENT_* environment variables override defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_AGENT_", extra="ignore")

    state_dir: Path = Field(
        default=Path("/var/lib/edgefleet-agent"),
        description="Key, identity, pinned CA, command log and telemetry outbox.",
    )
    node_red: str = Field(default="http://127.0.0.1:1880", description="Node-RED's Admin API.")
    node_red_username: str | None = None
    node_red_password: str | None = None
    keepalive: int = 30
    max_reconnect_delay: int = 60
    # Telemetry: the outbox in the state directory, the loopback intake Node-RED posts to, and
    # the agent's own host metrics.
    telemetry_intake: bool = Field(default=True, description="Serve the local HTTP intake.")
    telemetry_intake_host: str = Field(
        default="127.0.0.1", description="Address of the intake (loopback: only this machine)."
    )
    telemetry_intake_port: int = Field(
        default=1881, ge=0, le=65535, description="Port of the intake (Node-RED has 1880)."
    )
    host_metrics_interval: float = Field(
        default=60.0, ge=0, description="Seconds between host samples (CPU, memory, disk); 0: off."
    )
    outbox_max_samples: int = Field(
        default=1_000_000, ge=1, description="Samples kept while offline; past it the oldest go."
    )
    outbox_batch_size: int = Field(
        default=100, ge=1, le=1000, description="Samples per telemetry message."
    )
    # The machine owner's word on support tunnels: off unless they opt in, and then only these
    # ports for at most this long. A tunnel.open asking for more is refused.
    tunnel_allowed: bool = Field(default=False, description="Allow remote support tunnels.")
    tunnel_allowed_ports: Annotated[list[int], NoDecode] = Field(
        default_factory=list, description="Ports a support tunnel may ever open (e.g. 1880,22)."
    )
    tunnel_max_ttl: float = Field(default=12 * 3600.0, gt=0, description="Longest tunnel, seconds.")
    tunnel_interface: str = Field(
        default="eftun0",
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$",
        description="Name of the tunnel's WireGuard interface.",
    )

    @field_validator("tunnel_allowed_ports", mode="before")
    @classmethod
    def _split_ports(cls, value: Any) -> Any:
        """EDGEFLEET_AGENT_TUNNEL_ALLOWED_PORTS=1880,22 (a list is taken as it is)."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("tunnel_allowed_ports")
    @classmethod
    def _check_ports(cls, value: list[int]) -> list[int]:
        bad = [port for port in value if not 0 < port < 65536]
        if bad:
            raise ValueError(f"ports must be 1..65535, not {bad}")
        return sorted(set(value))
