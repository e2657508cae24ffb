"""What the deployer keeps on disk: each deployment's result, the last-known-good flows, the
rev it last wrote, and the journal of a write in progress.

Everything lives in one state directory (``node-red-deployer/`` in the agent's):
``results/<sha256 of the deployment id>.json`` (one per deployment, the newest `max_results`
kept), ``node-red-state.json`` (`DeployerState`) and ``lock``. Every file is replaced atomically
(written beside, fsynced, renamed), so a crash leaves the old file or the new one. `locked()`
serialises deploys: a thread lock, plus an flock on ``lock`` so two agent processes on one
machine cannot interleave.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from provisioning.files import write_private
from provisioning.states import DeviceDeployState

DeployStatus = Literal[
    DeviceDeployState.succeeded,
    DeviceDeployState.failed,
    DeviceDeployState.rolled_back,
    DeviceDeployState.drift,
]
"""How a deployment ended on this machine (the deploy command's final state)."""

_STATE_FILE = "node-red-state.json"
_RESULTS_DIR = "results"
_LOCK_FILE = "lock"


class DeployResult(BaseModel):
    """The outcome of one deployment on this machine, as reported to the gateway."""

    model_config = ConfigDict(frozen=True)

    deployment_id: str
    status: DeployStatus
    rev: str | None = None
    """Node-RED's flows rev after the deployment (the new one, or the restored one)."""
    error: str | None = None
    bundle_digest: str
    retryable: bool = False
    """True when nothing was changed because Node-RED was unreachable; such a result is not
    stored, so the same deployment id can be tried again."""
    finished_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class LastKnownGood(BaseModel):
    """Flows we deployed and verified (or found on the machine at the first deploy)."""

    model_config = ConfigDict(frozen=True)

    rev: str
    flows: list[dict[str, Any]]
    deployment_id: str | None = None
    bundle_digest: str | None = None


class PendingWrite(BaseModel):
    """A deploy about to be written: recognised as our own if the agent dies half-way."""

    deployment_id: str
    flows_digest: str


class DeployerState(BaseModel):
    """The rev the deployer last wrote, the flows to roll back to, a write in progress."""

    written_rev: str
    good: LastKnownGood
    pending: PendingWrite | None = None


class DeployerStore:
    """The deployer's state directory (see the module's docstring)."""

    def __init__(self, state_dir: Path, max_results: int = 1000) -> None:
        self.state_dir = state_dir
        self.max_results = max_results
        self._lock = threading.Lock()
        (state_dir / _RESULTS_DIR).mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold this state directory for one deploy (threads and processes alike)."""
        with self._lock, (self.state_dir / _LOCK_FILE).open("a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _result_path(self, deployment_id: str) -> Path:
        name = hashlib.sha256(deployment_id.encode("utf-8")).hexdigest()
        return self.state_dir / _RESULTS_DIR / f"{name}.json"

    def result(self, deployment_id: str) -> DeployResult | None:
        """The stored result of a deployment id, if it ran on this machine before."""
        return _read(
            self._result_path(deployment_id),
            DeployResult,
            "stored deployment result {path} is unreadable ({errors} errors); move it away to "
            "let the deployment run again",
        )

    def save_result(self, result: DeployResult) -> None:
        """Keep a result (the oldest beyond `max_results` go)."""
        write_private(
            self._result_path(result.deployment_id), result.model_dump_json().encode("utf-8")
        )
        results = sorted(
            (self.state_dir / _RESULTS_DIR).glob("*.json"), key=lambda p: p.stat().st_mtime
        )
        for old in results[: max(0, len(results) - self.max_results)]:
            old.unlink(missing_ok=True)

    def load(self) -> DeployerState | None:
        """The stored state, None before the first deploy; an unreadable file is an error."""
        return _read(
            self.state_dir / _STATE_FILE,
            DeployerState,
            "deployer state {path} is unreadable ({errors} errors); it holds the last-known-good "
            "flows, so it was not overwritten; repair or remove it",
        )

    def save(self, state: DeployerState) -> None:
        write_private(self.state_dir / _STATE_FILE, state.model_dump_json().encode("utf-8"))


Stored = TypeVar("Stored", bound=BaseModel)


def _read(path: Path, model: type[Stored], unreadable: str) -> Stored | None:
    """The file as `model`; None when there is none; RuntimeError(`unreadable`) when it is bad."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise RuntimeError(unreadable.format(path=path, errors=exc.error_count())) from exc
