"""The gateway's errors, in two families, all here.

- `GatewayError`: what a request did wrong or cannot get now (the feature errors `Gone`,
  `OpenTimedOut` and `OpenFailed` among them). The HTTP layer turns each into a
  ``{detail, reason}`` body with the class's status.
- `StartupError`: a part the gateway needs is missing, misconfigured or taken (a port, the
  database, the broker, the tunnel hub). `edgefleet gateway run` prints the message, which says
  why and which flag changes it, and exits 2. The broker's and the database's can also surface
  later, from the part that raises them; the registry turns those into `Unavailable`.
"""

from __future__ import annotations


class GatewayError(Exception):
    status = 400

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class NotFound(GatewayError):
    status = 404


class Conflict(GatewayError):
    status = 409


class Unauthorized(GatewayError):
    status = 401


class Forbidden(GatewayError):
    status = 403


class Invalid(GatewayError):
    status = 422


class Unavailable(GatewayError):
    status = 503


class Gone(GatewayError):
    """The thing exists but may no longer be used (a cancelled or timed-out deployment)."""

    status = 410


class OpenTimedOut(GatewayError):
    """A tunnel's device did not come up in time (offline, or no WireGuard handshake)."""

    status = 504


class OpenFailed(GatewayError):
    """A tunnel's device or the hub could not bring the tunnel up."""

    status = 502


# -- start-up --------------------------------------------------------------------------------


class StartupError(RuntimeError):
    """The gateway cannot start; the message says why and which flag changes it."""


class PortInUseError(StartupError):
    """A port the gateway listens on is taken; the message names it and the flag to change it."""

    def __init__(self, port: int, bind: str, flag: str = "--mqtt-port") -> None:
        super().__init__(
            f"port {port} is already in use (on {bind or '0.0.0.0'}); "
            f"choose another with {flag}, or stop what is listening there"
        )
        self.port = port


class DatabaseUnavailable(StartupError):
    """The database cannot be reached; the message names the URL (without password)."""


class BrokerError(StartupError):
    """The broker could not be reached, or refused what was asked (its files included)."""


class BrokerUnavailable(BrokerError):
    """Not connected to the broker in time, or no answer from it: the outcome is unknown."""


class BrokerRefused(BrokerError):
    """The broker answered no: the connection, a subscription or a command was refused."""


class DeviceExistsError(BrokerRefused):
    """The device already has a broker credential."""


class TunnelSetupError(StartupError):
    """The tunnel hub cannot start as configured; the message says what to change."""


class HubConflictError(StartupError):
    """Another tunnel hub serves this database."""
