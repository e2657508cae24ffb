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
