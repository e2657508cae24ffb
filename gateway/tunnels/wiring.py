"""Wires support tunnels into a running gateway: reply hooks, the reaper job, the hub runner."""

from __future__ import annotations

import contextlib

from gateway.errors import HubConflictError, TunnelSetupError
from gateway.runtime import GatewayRuntime
from gateway.tunnels import reaper
from gateway.tunnels.hooks import TunnelReplyHooks
from gateway.tunnels.hub_runner import HubRunner
from gateway.tunnels.wireguard.hub import TunnelHub
from gateway.tunnels.wireguard.pool import PoolError
from provisioning.wireguard.tools import WireGuardError

#: The hub's key, pid file and log live here, in the gateway's data directory.
HUB_STATE_DIR = "tunnel-hub"


def install(runtime: GatewayRuntime, stack: contextlib.ExitStack) -> HubRunner | None:
    """Register the tunnel reply hooks and the reaper; start the hub if this replica runs it
    (`stack` stops it). Call before the reply listener and the singleton jobs start."""
    settings = runtime.settings
    runner: HubRunner | None = None
    if settings.tunnel_hub:
        if not settings.tunnel_endpoint:
            raise TunnelSetupError(
                "--tunnel-hub needs --tunnel-endpoint HOST:PORT: the address machines and "
                "engineers dial (UDP) to reach this hub"
            )
        try:
            hub = TunnelHub(
                settings.data_dir / HUB_STATE_DIR,
                interface=settings.tunnel_interface,
                listen_port=settings.tunnel_listen_port,
                network=settings.tunnel_network,
                mtu=settings.tunnel_mtu,
            )
            runner = HubRunner(runtime, hub, settings.tunnel_endpoint)
            runner.start()
        except (WireGuardError, PoolError, HubConflictError) as exc:
            raise TunnelSetupError(f"cannot start the tunnel hub: {exc}") from exc
        stack.callback(runner.stop)
    TunnelReplyHooks(notify=runner.wake if runner else None).register(runtime.hooks)
    if runtime.jobs is not None:
        runtime.jobs.add("tunnel-reaper", reaper.INTERVAL, lambda: reaper.reap(runtime))
    return runner
