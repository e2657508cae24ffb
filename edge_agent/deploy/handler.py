"""The agent's `deploy` command: fetch the release from the gateway, apply it to Node-RED.

The command (already verified by the inbox: signature, audience, expiry, replay) names a
deployment, a release digest and the sha256 of each module tarball. The handler downloads the
bundle over HTTP with the device's JWT and checks it hashes to that digest, then lets the
`FlowDeployer` install missing modules from the gateway's cache, deploy, verify and roll back.
Each step is reported to the gateway as a progress reply.

A deployment applies once on a machine: a second command for the same deployment (a resend, or
the same command redelivered) returns the first result without downloading or deploying again.
If the gateway says the deployment was cancelled or timed out meanwhile (a command that waited
in the broker while the machine was off), nothing is applied and the result is `cancelled`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import httpx
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.deploy.deployer import FlowDeployer
from edge_agent.deploy.modules import GatewayModuleSource
from edge_agent.deploy.store import DeployResult
from edge_agent.gateway_api import GatewayApi, GatewayApiError
from edge_agent.node_red import NodeRedClient
from edge_agent.runner import Agent, Progress
from edge_agent.settings import AgentSettings
from edge_agent.state import Identity
from provisioning.bundles import Bundle, InvalidBundle
from provisioning.commands import InvalidArgs
from provisioning.deploy_command import DeployArgs, DeployCommandResult
from provisioning.jwt_rules import Command
from provisioning.states import DEPLOY_PROGRESS, CommandState

__all__ = ["DeployHandler"]

log = logging.getLogger(__name__)

DEPLOYER_DIR = "node-red-deployer"


class _NotApplied(Exception):
    def __init__(self, state: CommandState, detail: str) -> None:
        super().__init__(detail)
        self.state = state
        self.detail = detail


class DeployHandler:
    """Handles `deploy` commands; also an agent component so its connections close at stop."""

    def __init__(self, api: GatewayApi, node_red: NodeRedClient, state_dir: Path) -> None:
        self._api = api
        self._node_red = node_red
        self._state_dir = state_dir / DEPLOYER_DIR
        self._results = FlowDeployer(node_red, self._state_dir)

    @classmethod
    def from_settings(cls, settings: AgentSettings, identity: Identity) -> DeployHandler:
        node_red = NodeRedClient(
            settings.node_red, settings.node_red_username, settings.node_red_password
        )
        return cls(GatewayApi(identity), node_red, settings.state_dir)

    # ---- the command ---------------------------------------------------------------------------

    def __call__(self, command: Command, progress: Progress) -> DeployCommandResult:
        try:
            args = DeployArgs.parse(command.args)
        except InvalidArgs as exc:
            detail = f"a malformed deploy command: {exc}"
            return DeployCommandResult(state=CommandState.failed, detail=detail)
        stored = self._results.stored_result(args.deployment_id)
        if stored is not None:
            log.info("deployment %s ran here before: %s", args.deployment_id, stored.status)
            return self._report(stored, args)
        reporter = _Reporter(progress)
        reporter(CommandState.downloading, args.release)
        try:
            bundle = self._download(args)
        except _NotApplied as exc:
            return DeployCommandResult(
                state=exc.state,
                detail=exc.detail,
                deployment_id=args.deployment_id,
                release=args.release,
            )
        if not bundle.modules:
            reporter.skip(CommandState.installing)
        with tempfile.TemporaryDirectory(prefix="modules-", dir=self._state_dir) as tmp:
            deployer = FlowDeployer(
                self._node_red,
                self._state_dir,
                module_source=GatewayModuleSource(self._api, args.modules, Path(tmp)),
            )
            result = deployer.apply(args.deployment_id, bundle, args.force, progress=reporter)
        return self._report(result, args)

    def _download(self, args: DeployArgs) -> Bundle:
        try:
            response = self._api.request(
                "GET", f"/agent/bundles/{args.release}", params={"deployment": args.deployment_id}
            )
        except GatewayApiError as exc:
            if exc.status == 410:
                raise _NotApplied(CommandState.cancelled, f"not applied: {exc.detail}") from exc
            raise _NotApplied(
                CommandState.failed,
                f"the gateway refused the release {args.release}: {exc.detail}",
            ) from exc
        except httpx.HTTPError as exc:
            raise _NotApplied(
                CommandState.failed, f"cannot download the release from the gateway: {exc}"
            ) from exc
        try:
            return Bundle.from_bytes(response.content, expected_digest=args.release)
        except InvalidBundle as exc:
            raise _NotApplied(
                CommandState.failed, f"the downloaded release is unusable: {exc}"
            ) from exc

    @staticmethod
    def _report(result: DeployResult, args: DeployArgs) -> DeployCommandResult:
        return DeployCommandResult(
            state=CommandState(result.status),
            detail=result.error or f"Node-RED runs rev {result.rev}",
            deployment_id=args.deployment_id,
            release=result.bundle_digest,
            rev=result.rev,
            retryable=result.retryable,
        )

    # ---- as a component ------------------------------------------------------------------------

    def start(self, agent: Agent) -> None:
        return None

    def stop(self) -> None:
        self._api.close()
        self._node_red.close()

    def on_connect(self) -> None:
        return None

    def on_disconnect(self) -> None:
        return None

    def on_publish(self, mid: int, reason_code: ReasonCode) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {}


class _Reporter:
    """Forwards each of `DEPLOY_PROGRESS` once: the deployer's own 'verifying' step is part of
    'applying' (see the progress contract in `provisioning.deploy_command`)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._seen: set[str] = set()

    def skip(self, state: str) -> None:
        self._seen.add(state)

    def __call__(self, step: str, detail: str | None) -> None:
        state = step if step in DEPLOY_PROGRESS else None
        if state is None or state in self._seen:
            return
        self._seen.add(state)
        self._progress(state, detail)
