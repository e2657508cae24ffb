"""Every state name that crosses a boundary, defined once: command kinds and states, deployment
and device-in-deployment states, tunnel states.

The gateway stores these strings, the agent reports them, the HTTP API shows them and the CLI
reads them. They are `StrEnum`s, so each member is its string (``CommandState.failed ==
"failed"``) in the database, in JSON and in messages. Only the standard library is imported here:
the CLI loads this module without pydantic.
"""

from __future__ import annotations

from enum import StrEnum


class CommandKind(StrEnum):
    """What a signed command asks a machine to do (the ``kind`` in its JWS)."""

    ping = "ping"
    deploy = "deploy"
    tunnel_open = "tunnel.open"
    tunnel_connect = "tunnel.connect"
    tunnel_close = "tunnel.close"


class CommandState(StrEnum):
    """A command's state: the gateway's own (`queued`, `sent`), then what the machine reports.

    `running` answers a repeat of a command the machine is still working on; `downloading`,
    `installing` and `applying` are a deploy's progress (`DEPLOY_PROGRESS`).
    """

    queued = "queued"
    sent = "sent"
    running = "running"
    downloading = "downloading"
    installing = "installing"
    applying = "applying"
    succeeded = "succeeded"
    failed = "failed"
    refused = "refused"
    rolled_back = "rolled_back"
    drift = "drift"
    expired = "expired"
    cancelled = "cancelled"


#: A command in one of these has its result: nothing the machine says later changes it.
FINAL_COMMAND_STATES = frozenset(
    {
        CommandState.succeeded,
        CommandState.failed,
        CommandState.rolled_back,
        CommandState.refused,
        CommandState.drift,
        CommandState.expired,
        CommandState.cancelled,
    }
)


class DeploymentState(StrEnum):
    """A deployment as a whole: `running` until it ends in one of the others."""

    running = "running"
    succeeded = "succeeded"
    partial = "partial"
    aborted = "aborted"
    cancelled = "cancelled"


class DeviceDeployState(StrEnum):
    """One device in a deployment, in the order it goes through them.

    ``pending -> sent -> downloading -> installing -> applying -> succeeded | failed |
    rolled_back | drift | cancelled``. The gateway sets `pending` and `sent`; the agent reports
    the progress states (`DEPLOY_PROGRESS`) as progress replies and one final state as the
    command's result (see `provisioning.deploy_command`).
    """

    pending = "pending"
    sent = "sent"
    downloading = "downloading"
    installing = "installing"
    applying = "applying"
    succeeded = "succeeded"
    failed = "failed"
    rolled_back = "rolled_back"
    drift = "drift"
    cancelled = "cancelled"


#: What an agent reports while it works on a deploy command, in this order. Checking that
#: Node-RED runs the new flows is part of `applying`.
DEPLOY_PROGRESS = (
    DeviceDeployState.downloading,
    DeviceDeployState.installing,
    DeviceDeployState.applying,
)
#: A device's command is out and its result not in yet.
DEPLOY_IN_FLIGHT = frozenset({DeviceDeployState.sent, *DEPLOY_PROGRESS})
#: The device's part is over without success.
DEPLOY_FAILURES = frozenset(
    {DeviceDeployState.failed, DeviceDeployState.rolled_back, DeviceDeployState.drift}
)
#: The device's part is over.
DEPLOY_FINAL = frozenset({DeviceDeployState.succeeded, DeviceDeployState.cancelled}) | (
    DEPLOY_FAILURES
)


class TunnelState(StrEnum):
    """A support tunnel's life (see `gateway.tunnels.states` for the transitions)."""

    requested = "requested"
    prepared = "prepared"
    dialing = "dialing"
    open = "open"
    closing = "closing"
    closed = "closed"
    expired = "expired"
    failed = "failed"


#: A tunnel in one of these is over.
TUNNEL_FINAL = (TunnelState.closed, TunnelState.expired, TunnelState.failed)
