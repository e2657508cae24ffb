"""Agent configuration: flags override EDGEFLEET_AGENT_* environment variables override defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
