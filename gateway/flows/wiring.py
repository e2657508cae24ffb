"""Plugs flow pushes into a gateway: the `deploy` reply hook and the rollout scheduler job."""

from __future__ import annotations

import contextlib

from gateway.flows.replies import make_reply_hook
from gateway.flows.scheduler import RolloutScheduler
from gateway.runtime import GatewayRuntime
from provisioning.states import CommandKind


def install(runtime: GatewayRuntime, stack: contextlib.ExitStack) -> RolloutScheduler:
    """Register the reply hook (every replica stores deploy replies) and add the scheduler to
    the singleton jobs (only the leader sends waves). Call before the reply listener starts.

    Nothing here runs a thread of its own, so `stack` gets nothing to stop."""
    runtime.hooks.register(CommandKind.deploy, make_reply_hook())
    scheduler = RolloutScheduler(runtime.engine, runtime.identity, runtime.command_publisher)
    if runtime.jobs is not None:
        runtime.jobs.add("rollouts", runtime.settings.rollout_interval, scheduler.run)
    return scheduler
