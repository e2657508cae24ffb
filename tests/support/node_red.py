"""Start a real Node-RED for a test: free loopback port, own user dir, killed on the way out.

Node-RED comes from npm (`npm install --prefix .cache/node-red node-red@4`, done by the setup
script); `EDGEFLEET_NODE_RED` may name another `node-red` executable. Tests that need it call
`node_red_executable()` first, which skips them with the reason when it is missing.

    with start_node_red(tmp_path, admin_password="s3cret") as nr:
        client = NodeRedClient(nr.url, nr.username, nr.password)

Starting takes a few seconds, so start one per test module and reset the flows per test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import local_http
from tests.support.waiting import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
DEFAULT_NODE_RED = REPO / ".cache" / "node-red" / "node_modules" / ".bin" / "node-red"
CREDENTIAL_SECRET = "edgefleet-test-credential-secret"
ADMIN_USER = "admin"
STARTUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class NodeRedHandle:
    """A running test Node-RED."""

    url: str
    port: int
    user_dir: Path
    log_path: Path
    pid: int
    username: str | None
    password: str | None

    @property
    def flows_file(self) -> Path:
        return self.user_dir / "flows.json"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"


def node_red_executable() -> Path:
    """The `node-red` to run, or skip the calling test with the reason."""
    configured = os.environ.get("EDGEFLEET_NODE_RED")
    candidate = Path(configured) if configured else DEFAULT_NODE_RED
    if not candidate.exists():
        pytest.skip(
            f"Node-RED not found at {candidate}; install it with "
            "`npm install --prefix .cache/node-red node-red@4` or set EDGEFLEET_NODE_RED"
        )
    if shutil.which("node") is None:
        pytest.skip("Node-RED needs `node` on PATH")
    return candidate


def bcrypt_hash(password: str, executable: Path | None = None) -> str:
    """Hash a password the way adminAuth expects, with the bcryptjs that ships with Node-RED."""
    red_js = (executable or node_red_executable()).resolve()
    script = (
        "const b = require(require.resolve('bcryptjs', {paths: [process.argv[1]]}));"
        "process.stdout.write(b.hashSync(process.env.EDGEFLEET_PW, 8));"
    )
    done = subprocess.run(
        ["node", "-e", script, str(red_js.parent)],
        env={**os.environ, "EDGEFLEET_PW": password},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout.strip()


def _settings_js(password_hash: str | None) -> str:
    """settings.js as JSON (valid JavaScript): loopback only, fixed secret, runtime state on."""
    settings: dict[str, object] = {
        "uiHost": "127.0.0.1",
        "flowFile": "flows.json",
        "credentialSecret": CREDENTIAL_SECRET,
        "runtimeState": {"enabled": True, "ui": False},
        "editorTheme": {"tours": False, "projects": {"enabled": False}},
        "diagnostics": {"enabled": False},
        "telemetry": {"enabled": False},
        "logging": {"console": {"level": "info", "metrics": False, "audit": False}},
    }
    if password_hash is not None:
        settings["adminAuth"] = {
            "type": "credentials",
            "users": [{"username": ADMIN_USER, "password": password_hash, "permissions": "*"}],
        }
    return "module.exports = " + json.dumps(settings, indent=2) + ";\n"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """TERM the Node-RED process group (node-red may spawn npm), KILL if it lingers."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    else:  # the leader died; children of its group may still run
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@contextmanager
def start_node_red(
    tmp_dir: Path,
    admin_password: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[NodeRedHandle]:
    """Run Node-RED with its user dir under `tmp_dir` until the block ends.

    `admin_password` turns on adminAuth for user `admin`. `env` adds environment variables
    (for example `npm_config_registry` pointing nowhere, to prove installs need no registry).
    """
    executable = node_red_executable()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    user_dir = tmp_dir / "node-red-userdir"
    user_dir.mkdir()
    settings = tmp_dir / "node-red-settings.js"
    password_hash = bcrypt_hash(admin_password, executable) if admin_password else None
    settings.write_text(_settings_js(password_hash))
    port = free_port()
    log_path = tmp_dir / "node-red.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(executable),
                "--port",
                str(port),
                "--userDir",
                str(user_dir),
                "--settings",
                str(settings),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "NODE_RED_ENABLE_PROJECTS": "false", **(env or {})},
            start_new_session=True,
        )
    handle = NodeRedHandle(
        url=f"http://127.0.0.1:{port}",
        port=port,
        user_dir=user_dir,
        log_path=log_path,
        pid=process.pid,
        username=ADMIN_USER if admin_password else None,
        password=admin_password,
    )
    try:

        def answers() -> str | None:
            if process.poll() is not None:
                return "exited"
            response = local_http.get(f"{handle.url}/flows", timeout=2)
            return "up" if response.status_code in (200, 401) else None

        try:
            outcome = wait_for(
                answers, timeout=STARTUP_TIMEOUT, interval=0.2, what="Node-RED to start"
            )
        except TimeoutError as exc:
            raise RuntimeError(f"Node-RED did not start; its log:\n{handle.log_tail()}") from exc
        if outcome == "exited":
            raise RuntimeError(
                f"Node-RED exited with {process.returncode}; its log:\n{handle.log_tail()}"
            )
        yield handle
    finally:
        _stop(process)


def admin_headers(handle: NodeRedHandle) -> dict[str, str]:
    """Headers for Admin API calls: API v2, plus a Bearer token when adminAuth is on."""
    headers = {"Node-RED-API-Version": "v2"}
    if handle.password is not None:
        response = local_http.post(
            f"{handle.url}/auth/token",
            data={
                "client_id": "node-red-admin",
                "grant_type": "password",
                "scope": "*",
                "username": handle.username,
                "password": handle.password,
            },
            timeout=10,
        )
        response.raise_for_status()
        headers["Authorization"] = f"Bearer {response.json()['access_token']}"
    return headers


def set_flows(handle: NodeRedHandle, flows: list[dict[str, object]]) -> str:
    """Replace the flows directly through the Admin API (as a person at the machine would);
    return the new rev. Tests use it to reset Node-RED to a known state."""
    headers = admin_headers(handle)
    current = local_http.get(f"{handle.url}/flows", headers=headers, timeout=10)
    current.raise_for_status()
    response = local_http.post(
        f"{handle.url}/flows",
        headers={**headers, "Node-RED-Deployment-Type": "full"},
        json={"rev": current.json()["rev"], "flows": flows},
        timeout=10,
    )
    response.raise_for_status()
    return str(response.json()["rev"])


def get_flows(handle: NodeRedHandle) -> tuple[str, list[dict[str, object]]]:
    """Read (rev, flows) straight from the Admin API, independent of the code under test."""
    response = local_http.get(f"{handle.url}/flows", headers=admin_headers(handle), timeout=10)
    response.raise_for_status()
    body = response.json()
    return str(body["rev"]), list(body["flows"])


def flows_for(label: str, *extra_types: str) -> list[dict[str, Any]]:
    """A small real flow: a tab, an inject wired to a debug, plus one node per extra type."""
    tab = f"tab-{label}"
    flows: list[dict[str, Any]] = [
        {"id": tab, "type": "tab", "label": label, "disabled": False, "info": ""},
        {
            "id": f"inject-{label}",
            "type": "inject",
            "z": tab,
            "name": label,
            "props": [{"p": "payload"}],
            "repeat": "",
            "once": False,
            "payload": label,
            "payloadType": "str",
            "x": 100,
            "y": 40,
            "wires": [[f"debug-{label}"]],
        },
        {
            "id": f"debug-{label}",
            "type": "debug",
            "z": tab,
            "active": True,
            "complete": "payload",
            "x": 300,
            "y": 40,
            "wires": [],
        },
    ]
    for index, node_type in enumerate(extra_types):
        flows.append(
            {
                "id": f"x{index}-{label}",
                "type": node_type,
                "z": tab,
                "x": 100,
                "y": 100,
                "wires": [],
            }
        )
    return flows
