"""Puts an agent together from its settings: which commands it handles, which parts it runs.

Each feature adds itself here (one place to see everything an agent does).
"""

from __future__ import annotations

from edge_agent.deploy.handler import DeployHandler
from edge_agent.runner import Agent, Component, Handler
from edge_agent.settings import AgentSettings
from edge_agent.state import AgentState
from edge_agent.telemetry.component import TelemetryComponent
from edge_agent.tunnel.handler import TunnelCommands
from provisioning.states import CommandKind


def build_agent(settings: AgentSettings) -> Agent:
    handlers: dict[str, Handler] = {}
    components: list[Component] = []
    deploy = DeployHandler.from_settings(settings, AgentState(settings.state_dir).load())
    handlers[CommandKind.deploy] = deploy
    components.append(deploy)
    components.append(TelemetryComponent(settings))
    tunnels = TunnelCommands.from_settings(settings)
    handlers.update(tunnels.handlers())
    components.append(tunnels)
    return Agent(settings, handlers=handlers, components=components)
