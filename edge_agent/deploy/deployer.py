"""Apply a flow bundle to the local Node-RED: install modules, deploy, verify, roll back.

The rules this module keeps, and why:

- **Once per deployment id.** The gateway may send a command twice (MQTT QoS 1 redelivery, an
  operator retry); the result of each deployment id is stored on disk and a repeat returns it
  without touching Node-RED.
- **Never overwrite someone's work silently.** The rev of the flows we last wrote is kept on
  disk. If Node-RED's rev differs, someone changed the flows on the machine (drift): we report
  it and change nothing unless the deployment says force. The first deploy on a machine takes
  whatever Node-RED runs as the baseline.
- **Last-known-good.** The flows (and rev) of the last verified deploy are kept on disk; when a
  deploy or its check fails, they are written back and the result is "rolled_back".
- **Verified, not assumed.** Node-RED accepts flows with node types it does not have and then
  just waits ("waiting for missing types"), so success means: Node-RED's rev is the one our
  deploy returned, every node type the flows use is registered in the runtime, and the runtime
  is not stopped.
- **No public registry.** Missing modules come as tarballs from a pluggable ModuleSource (the
  gateway's module cache in production) and are uploaded to Node-RED, which installs them
  offline. Module installs are not undone on rollback: they only add node types.
- **Crash-safe state.** Every state file is replaced atomically (`DeployerStore`). Before a
  deploy we journal what we are about to write, so if the agent dies between Node-RED's answer
  and saving the new rev, the next run recognises its own write instead of calling it drift.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from edge_agent.deploy.store import (
    DeployerState,
    DeployerStore,
    DeployResult,
    DeployStatus,
    LastKnownGood,
    PendingWrite,
)
from edge_agent.node_red import (
    NodeRedClient,
    NodeRedError,
    NodeRedUnavailable,
    RevisionConflict,
)
from provisioning.bundles import Bundle, ModuleRef, canonical_json
from provisioning.states import DeviceDeployState

__all__ = [
    "DirectoryModuleSource",
    "FlowDeployer",
    "ModuleSource",
    "ModuleUnavailable",
    "ProgressCallback",
    "tarball_name",
]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, str | None], None]
"""Called as progress(step, detail) with step "installing", "applying" or "verifying"."""
#: The deployer's last step, checking Node-RED runs the new flows: on the wire it is part of
#: `applying` (the deploy handler does not forward it).
VERIFYING = "verifying"


class ModuleUnavailable(Exception):
    """A module source cannot supply the tarball for a module version."""


class ModuleSource(Protocol):
    """Where the agent gets node module tarballs (`npm pack` format) from."""

    def fetch(self, name: str, version: str) -> Path:
        """Return a local path to the tarball of `name@version`, or raise ModuleUnavailable."""
        ...


def tarball_name(name: str, version: str) -> str:
    """The file name `npm pack` gives a package: `@scope/pkg` 1.0.0 -> `scope-pkg-1.0.0.tgz`."""
    return f"{name.removeprefix('@').replace('/', '-')}-{version}.tgz"


class DirectoryModuleSource:
    """Tarballs in one local directory, named as `npm pack` names them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def fetch(self, name: str, version: str) -> Path:
        path = self.directory / tarball_name(name, version)
        if not path.is_file():
            raise ModuleUnavailable(
                f"no tarball for {name}@{version} in {self.directory} (expected "
                f"{path.name}); add it with `npm pack {name}@{version}`"
            )
        return path


def _flows_digest(flows: Sequence[dict[str, Any]]) -> str:
    return hashlib.sha256(canonical_json(list(flows))).hexdigest()


class FlowDeployer:
    """Deploys bundles to one Node-RED, keeping its state (results, last-known-good) on disk.

    Calls to `apply` are serialised (a thread lock, plus a file lock on the state dir so two
    agent processes cannot interleave on one machine).
    """

    def __init__(
        self,
        client: NodeRedClient,
        state_dir: Path,
        module_source: ModuleSource | None = None,
        max_results: int = 1000,
    ) -> None:
        self.client = client
        self.state_dir = state_dir
        self.module_source = module_source
        self.store = DeployerStore(state_dir, max_results)

    def stored_result(self, deployment_id: str) -> DeployResult | None:
        """The stored result of a deployment id, if it ran on this machine before."""
        return self.store.result(deployment_id)

    def last_known_good(self) -> LastKnownGood | None:
        """The flows a failed deploy would be rolled back to (None before the first deploy)."""
        state = self.store.load()
        return state.good if state else None

    # -- the deploy ------------------------------------------------------------------------

    def apply(
        self,
        deployment_id: str,
        bundle: Bundle,
        force: bool = False,
        progress: ProgressCallback | None = None,
    ) -> DeployResult:
        """Apply `bundle` once for `deployment_id` and return what happened.

        Never raises for Node-RED or module trouble: that is the returned result. A repeat of
        a deployment id returns the first result and deploys nothing.
        """
        if not deployment_id:
            raise ValueError("a deployment id is required (it makes repeats deploy once)")
        with self.store.locked():
            stored = self.stored_result(deployment_id)
            if stored is not None:
                if stored.bundle_digest != bundle.digest:
                    logger.warning(
                        "deployment %s repeated with another bundle (%s, first %s); "
                        "returning the first result",
                        deployment_id,
                        bundle.digest,
                        stored.bundle_digest,
                    )
                logger.info("deployment %s already applied: %s", deployment_id, stored.status)
                return stored
            run = _Run(self, deployment_id, bundle, force, progress)
            result = run.execute()
            if not result.retryable:
                self.store.save_result(result)
            logger.info(
                "deployment %s: %s (rev %s)%s",
                deployment_id,
                result.status,
                result.rev,
                f": {result.error}" if result.error else "",
            )
            return result


class _Run:
    """One apply call; holds its inputs so the steps read as a sequence."""

    def __init__(
        self,
        deployer: FlowDeployer,
        deployment_id: str,
        bundle: Bundle,
        force: bool,
        progress: ProgressCallback | None,
    ) -> None:
        self.deployer = deployer
        self.client = deployer.client
        self.store = deployer.store
        self.deployment_id = deployment_id
        self.bundle = bundle
        self.digest = bundle.digest
        self.force = force
        self.progress_cb = progress

    def result(
        self,
        status: DeployStatus,
        rev: str | None,
        error: str | None = None,
        retryable: bool = False,
    ) -> DeployResult:
        return DeployResult(
            deployment_id=self.deployment_id,
            status=status,
            rev=rev,
            error=error,
            bundle_digest=self.digest,
            retryable=retryable,
        )

    def progress(self, step: str, detail: str | None) -> None:
        """Report a step; a broken reporter must not break the deploy."""
        logger.debug("deployment %s: %s %s", self.deployment_id, step, detail or "")
        if self.progress_cb is None:
            return
        try:
            self.progress_cb(step, detail)
        except Exception:
            logger.exception("progress callback failed for deployment %s", self.deployment_id)

    def execute(self) -> DeployResult:
        try:
            rev_now, flows_now = self.client.get_flows()
        except NodeRedUnavailable as exc:
            return self.result(DeviceDeployState.failed, None, str(exc), retryable=True)
        except NodeRedError as exc:
            return self.result(
                DeviceDeployState.failed, None, f"reading Node-RED's flows failed: {exc}"
            )

        state = self._reconcile(rev_now, flows_now)
        if rev_now != state.written_rev:
            if not self.force:
                return self.result(
                    DeviceDeployState.drift,
                    rev_now,
                    f"Node-RED's flows were changed on the machine (rev {rev_now}; the agent "
                    f"last deployed rev {state.written_rev}); nothing was changed. Deploy with "
                    "force to overwrite them",
                )
            logger.warning(
                "deployment %s forces over drifted flows (rev %s, ours %s); they become "
                "the rollback target",
                self.deployment_id,
                rev_now,
                state.written_rev,
            )
            state = DeployerState(
                written_rev=rev_now, good=LastKnownGood(rev=rev_now, flows=flows_now)
            )
            self.store.save(state)

        try:
            self._install_modules()
        except NodeRedUnavailable as exc:
            return self.result(DeviceDeployState.failed, rev_now, str(exc), retryable=True)
        except (NodeRedError, ModuleUnavailable, _InstallFailed) as exc:
            return self.result(DeviceDeployState.failed, rev_now, f"module install failed: {exc}")

        self.progress(
            DeviceDeployState.applying, f"{len(self.bundle.flows)} nodes over rev {rev_now}"
        )
        pending = PendingWrite(
            deployment_id=self.deployment_id, flows_digest=_flows_digest(self.bundle.flows)
        )
        self.store.save(state.model_copy(update={"pending": pending}))
        try:
            new_rev = self._deploy(rev_now)
        except RevisionConflict as exc:
            self.store.save(state)
            return self.result(
                DeviceDeployState.drift,
                None,
                f"{exc}; nothing was changed. Deploy with force to overwrite them",
            )
        except NodeRedError as exc:
            return self._after_failed_deploy(state, rev_now, f"deploy failed: {exc}")
        state = state.model_copy(update={"written_rev": new_rev, "pending": None})
        self.store.save(state)

        self.progress(VERIFYING, new_rev)
        try:
            problem = self._verify(new_rev)
        except NodeRedError as exc:
            problem = f"cannot check the new flows: {exc}"
        if problem is not None:
            return self._rollback(state, problem)
        good = LastKnownGood(
            rev=new_rev,
            flows=self.bundle.flows,
            deployment_id=self.deployment_id,
            bundle_digest=self.digest,
        )
        self.store.save(state.model_copy(update={"good": good}))
        return self.result(DeviceDeployState.succeeded, new_rev)

    def _reconcile(self, rev_now: str, flows_now: list[dict[str, Any]]) -> DeployerState:
        """Load our state; take a baseline on first use; recognise an interrupted own write."""
        state = self.store.load()
        if state is None:
            logger.info(
                "first deployment on this machine: Node-RED's rev %s is the baseline", rev_now
            )
            state = DeployerState(
                written_rev=rev_now, good=LastKnownGood(rev=rev_now, flows=flows_now)
            )
            self.store.save(state)
            return state
        if state.pending is not None:
            if rev_now != state.written_rev and _flows_digest(flows_now) == (
                state.pending.flows_digest
            ):
                logger.warning(
                    "an interrupted deploy (%s) reached Node-RED as rev %s; not drift",
                    state.pending.deployment_id,
                    rev_now,
                )
                state = state.model_copy(update={"written_rev": rev_now})
            state = state.model_copy(update={"pending": None})
            self.store.save(state)
        return state

    def _install_modules(self) -> None:
        modules = self.bundle.modules
        if not modules:
            self.progress(DeviceDeployState.installing, "no modules needed")
            return
        installed = self.client.list_modules()
        missing = [m for m in modules if installed.get(m.name) != m.version]
        if not missing:
            self.progress(
                DeviceDeployState.installing, f"{len(modules)} module(s) already installed"
            )
            return
        if self.deployer.module_source is None:
            raise ModuleUnavailable(
                f"{', '.join(map(str, missing))} not installed and the agent has no module "
                "source configured"
            )
        for module in missing:
            self.progress(DeviceDeployState.installing, str(module))
            self._install(module, installed.get(module.name))

    def _install(self, module: ModuleRef, current: str | None) -> None:
        source = self.deployer.module_source
        assert source is not None
        try:
            tarball = source.fetch(module.name, module.version)
        except ModuleUnavailable:
            raise
        except Exception as exc:  # a plug-in: report whatever it raised, with its type
            raise ModuleUnavailable(
                f"fetching {module} failed: {type(exc).__name__}: {exc}"
            ) from exc
        info = self.client.install_tarball(tarball)
        if info.name != module.name:
            raise _InstallFailed(
                f"the tarball {tarball.name} for {module} installed module {info.name} instead"
            )
        if info.pending_version == module.version:
            raise _InstallFailed(
                f"{module} replaces version {current} that Node-RED has loaded; Node-RED runs "
                "the new version only after a restart, so the flows were not changed. "
                "Restart Node-RED and deploy again"
            )
        if info.version != module.version:
            raise _InstallFailed(
                f"installing {module} left version {info.version} loaded in Node-RED"
            )
        logger.info("installed %s (types: %s)", module, ", ".join(sorted(info.types)))

    def _deploy(self, rev_now: str) -> str:
        try:
            return self.client.deploy(self.bundle.flows, rev_now)
        except RevisionConflict:
            if not self.force:
                raise
            # Forced, and someone wrote between our read and our write: take their rev too.
            rev_again, _ = self.client.get_flows()
            return self.client.deploy(self.bundle.flows, rev_again)

    def _verify(self, new_rev: str) -> str | None:
        """None if Node-RED runs the new flows, else what is wrong."""
        rev, _ = self.client.get_flows()
        if rev != new_rev:
            return f"Node-RED reports rev {rev} right after our deploy of rev {new_rev}"
        missing = self.bundle.required_node_types() - self.client.list_node_types()
        if missing:
            return (
                f"Node-RED has no node type(s) {', '.join(sorted(missing))} (no installed "
                "module provides them), so it stopped the flows waiting for them; add the "
                "module that provides them to the release"
            )
        if self.client.runtime_state() == "stop":
            return "Node-RED's flows are stopped (someone stopped them on the machine)"
        return None

    def _after_failed_deploy(
        self, state: DeployerState, rev_before: str, reason: str
    ) -> DeployResult:
        """A POST /flows that failed may or may not have reached Node-RED: look before acting."""
        try:
            rev_after, _ = self.client.get_flows()
        except NodeRedError as exc:
            return self.result(
                DeviceDeployState.failed, None, f"{reason}; cannot read Node-RED's flows: {exc}"
            )
        if rev_after == rev_before:
            self.store.save(state)  # clears the pending write
            return self.result(
                DeviceDeployState.failed, rev_before, f"{reason}; Node-RED's flows are unchanged"
            )
        return self._rollback(state, reason)

    def _rollback(self, state: DeployerState, reason: str) -> DeployResult:
        logger.warning(
            "deployment %s failed (%s); restoring rev %s",
            self.deployment_id,
            reason,
            state.good.rev,
        )
        try:
            rev_now, _ = self.client.get_flows()
            restored = self.client.deploy(state.good.flows, rev_now)
        except NodeRedError as exc:
            return self.result(
                DeviceDeployState.failed,
                None,
                f"{reason}; restoring the previous flows failed: {exc}",
            )
        good = state.good.model_copy(update={"rev": restored})
        self.store.save(DeployerState(written_rev=restored, good=good))
        return self.result(
            DeviceDeployState.rolled_back,
            restored,
            f"{reason}; restored the previous flows (rev {restored})",
        )


class _InstallFailed(Exception):
    """Node-RED installed something other than the module version we asked for."""
