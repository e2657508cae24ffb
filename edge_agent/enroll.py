"""`edgefleet agent enroll`: make the key pair here, send the public half with the token."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import httpx

from edge_agent import __version__
from edge_agent.state import AgentState
from provisioning import keys
from provisioning.wire import EnrollRequest, EnrollResponse

log = logging.getLogger(__name__)


class EnrollmentError(RuntimeError):
    pass


class AlreadyEnrolled(EnrollmentError):
    pass


def enroll(
    gateway_url: str,
    token: str,
    state: AgentState,
    name: str | None = None,
    force: bool = False,
    ca_file: Path | None = None,
    timeout: float = 30.0,
) -> EnrollResponse:
    """Enroll this machine. Nothing in the state directory changes unless enrollment succeeds."""
    if state.enrolled and not force:
        current = state.load()
        raise AlreadyEnrolled(
            f"this machine is already enrolled as {current.device_id} with {current.gateway_url}; "
            "nothing changed (use --force to enroll again with a new key)"
        )
    key = keys.generate_private_key()  # a fresh pair every time: a key is never re-used
    request = EnrollRequest(
        token=token,
        public_key=keys.public_key_pem(key.public_key()),
        name=name,
        agent_version=__version__,
        hostname=socket.gethostname()[:255],
    )
    url = gateway_url.rstrip("/") + "/api/v1/enroll"
    verify: str | bool = str(ca_file) if ca_file else True
    try:
        response = httpx.post(
            url, json=request.model_dump(exclude_none=True), timeout=timeout, verify=verify
        )
    except httpx.TransportError as exc:
        raise EnrollmentError(f"cannot reach the gateway at {gateway_url}: {exc}") from exc
    if response.status_code != 201:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise EnrollmentError(
            f"the gateway refused the enrollment ({response.status_code}): {detail}"
        )
    result = EnrollResponse.model_validate_json(response.content)
    state.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(state.directory, 0o700)
    keys.write_private_key(state.key_path, key)
    state.save(gateway_url.rstrip("/"), result)
    log.info("enrolled as %s", result.device_id)
    return result
