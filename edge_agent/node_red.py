"""A small typed client for the Node-RED Admin API, as the edge agent uses it.

Only the calls a deployer needs: read and write flows with API v2 revisions (so a write never
silently replaces flows someone changed meanwhile), list what node types and modules the
runtime has, and install a module from a tarball (so no public npm registry is needed on an
air-gapped site). Failures are split into "Node-RED is not reachable" (NodeRedUnavailable,
worth retrying), "wrong or missing credentials" (NodeRedAuthError), "the revision moved"
(RevisionConflict), and everything else (NodeRedError with status and body).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

__all__ = [
    "ModuleInfo",
    "NodeRedAuthError",
    "NodeRedClient",
    "NodeRedError",
    "NodeRedUnavailable",
    "RevisionConflict",
]

logger = logging.getLogger(__name__)

_API_V2: Final = {"Node-RED-API-Version": "v2"}
_BODY_EXCERPT: Final = 500


class NodeRedError(Exception):
    """Node-RED answered, but not with what was asked for."""

    def __init__(self, message: str, *, status: int | None = None, body: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class NodeRedUnavailable(NodeRedError):
    """No answer from Node-RED (not running, wrong URL, timeout); nothing was changed."""


class NodeRedAuthError(NodeRedError):
    """Node-RED refused the credentials, or needs some (adminAuth) and none were configured."""


class RevisionConflict(NodeRedError):
    """`POST /flows` was refused with 409: the flows changed since the revision we sent."""


@dataclass(frozen=True)
class ModuleInfo:
    """A node module as Node-RED reports it after an install."""

    name: str
    version: str
    types: frozenset[str]
    pending_version: str | None = None
    """Set when an upgrade was installed but runs only after Node-RED restarts."""


def _excerpt(response: httpx.Response) -> str:
    try:
        text = response.text
    except (UnicodeDecodeError, httpx.ResponseNotRead):
        return "<unreadable body>"
    return text if len(text) <= _BODY_EXCERPT else text[:_BODY_EXCERPT] + "..."


class NodeRedClient:
    """Admin API client for one Node-RED; use as a context manager or call close().

    With `username`/`password`, it gets a Bearer token from `POST /auth/token` on first use and
    again when Node-RED answers 401 (tokens expire). Without them it talks to Node-RED as an
    anonymous client, which works only when adminAuth is off.
    """

    def __init__(
        self,
        base_url: str,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
        install_timeout: float = 300.0,
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("give both a Node-RED username and a password, or neither")
        self.base_url = base_url.rstrip("/")
        self._username = username
        self._password = password
        self._install_timeout = install_timeout
        self._token: str | None = None
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def __enter__(self) -> NodeRedClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- transport -------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise NodeRedUnavailable(
                f"Node-RED at {self.base_url} did not answer {method} {path} in time ({exc}); "
                "is it overloaded or stuck?"
            ) from exc
        except httpx.TransportError as exc:
            raise NodeRedUnavailable(
                f"cannot reach Node-RED at {self.base_url} ({exc}); is it running, and is "
                "the URL right?"
            ) from exc

    def _login(self) -> str:
        assert self._username is not None and self._password is not None
        response = self._send(
            "POST",
            "/auth/token",
            data={
                "client_id": "node-red-admin",
                "grant_type": "password",
                "scope": "*",
                "username": self._username,
                "password": self._password,
            },
        )
        if response.status_code in (401, 403):
            raise NodeRedAuthError(
                f"Node-RED at {self.base_url} refused the login of user {self._username!r}; "
                "check the Node-RED username and password in the agent's config",
                status=response.status_code,
                body=_excerpt(response),
            )
        if response.status_code == 404:
            raise NodeRedAuthError(
                f"Node-RED at {self.base_url} has no adminAuth (no /auth/token), but the agent "
                "is configured with credentials; remove them from the agent's config",
                status=404,
                body=_excerpt(response),
            )
        if response.status_code != 200:
            raise NodeRedError(
                f"Node-RED login failed with HTTP {response.status_code}",
                status=response.status_code,
                body=_excerpt(response),
            )
        token = response.json().get("access_token")
        if not isinstance(token, str) or not token:
            raise NodeRedError("Node-RED login answered without an access token", status=200)
        logger.debug("logged in to Node-RED at %s as %s", self.base_url, self._username)
        return token

    def _request(
        self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send with auth; log in (again) on 401 if credentials are configured."""
        if timeout is not None:
            kwargs["timeout"] = timeout
        headers = dict(kwargs.pop("headers", {}))
        for attempt in range(2):
            if self._username is not None and self._token is None:
                self._token = self._login()
            if self._token is not None:
                headers["Authorization"] = f"Bearer {self._token}"
            response = self._send(method, path, headers=headers, **kwargs)
            if response.status_code != 401:
                return response
            if self._username is None:
                raise NodeRedAuthError(
                    f"Node-RED at {self.base_url} requires a login (adminAuth is on); set the "
                    "Node-RED username and password in the agent's config",
                    status=401,
                    body=_excerpt(response),
                )
            self._token = None  # expired or revoked: log in once more
            if attempt == 1:
                raise NodeRedAuthError(
                    f"Node-RED at {self.base_url} refused a fresh token for {method} {path}; "
                    f"does user {self._username!r} have write permission ('*')?",
                    status=401,
                    body=_excerpt(response),
                )
        raise AssertionError("unreachable")

    @staticmethod
    def _fail(response: httpx.Response, what: str) -> NodeRedError:
        return NodeRedError(
            f"{what} failed: Node-RED answered HTTP {response.status_code}: {_excerpt(response)}",
            status=response.status_code,
            body=_excerpt(response),
        )

    @staticmethod
    def _json(response: httpx.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise NodeRedError(
                f"{what}: Node-RED answered with something that is not JSON",
                status=response.status_code,
                body=_excerpt(response),
            ) from exc

    # -- flows -----------------------------------------------------------------------------

    def get_flows(self) -> tuple[str, list[dict[str, Any]]]:
        """The active flows and their revision."""
        response = self._request("GET", "/flows", headers=_API_V2)
        if response.status_code != 200:
            raise self._fail(response, "reading the flows")
        body = self._json(response, "reading the flows")
        if not isinstance(body, dict) or not isinstance(body.get("rev"), str):
            raise NodeRedError(
                "reading the flows: the answer has no 'rev'; is this Node-RED 1.0 or newer?",
                status=200,
                body=_excerpt(response),
            )
        flows = body.get("flows")
        if not isinstance(flows, list):
            raise NodeRedError("reading the flows: the answer has no 'flows' array", status=200)
        return body["rev"], flows

    def deploy(self, flows: list[dict[str, Any]], rev: str) -> str:
        """Replace all flows (full deploy) if Node-RED is still at `rev`; return the new rev."""
        response = self._request(
            "POST",
            "/flows",
            headers={**_API_V2, "Node-RED-Deployment-Type": "full"},
            json={"rev": rev, "flows": flows},
        )
        if response.status_code == 409:
            raise RevisionConflict(
                f"Node-RED's flows changed since revision {rev} (409 version_mismatch); "
                "someone edited them on the machine",
                status=409,
                body=_excerpt(response),
            )
        if response.status_code not in (200, 204):
            raise self._fail(response, "deploying the flows")
        new_rev = self._json(response, "deploying the flows").get("rev")
        if not isinstance(new_rev, str):
            raise NodeRedError("deploying the flows: the answer has no 'rev'", status=200)
        return new_rev

    def runtime_state(self) -> str | None:
        """'start' or 'stop' from `GET /flows/state`, or None if the runtime does not say.

        Needs Node-RED 3.1+ with `runtimeState.enabled` in settings.js; note that it reports
        what was requested, so flows waiting for missing node types still read 'start'.
        """
        response = self._request("GET", "/flows/state")
        if response.status_code in (404, 405):
            return None
        if response.status_code != 200:
            raise self._fail(response, "reading the runtime state")
        state = self._json(response, "reading the runtime state")
        value = state.get("state") if isinstance(state, dict) else None
        return value if isinstance(value, str) else None

    # -- nodes and modules -----------------------------------------------------------------

    def _node_sets(self) -> list[dict[str, Any]]:
        response = self._request("GET", "/nodes", headers={"Accept": "application/json"})
        if response.status_code != 200:
            raise self._fail(response, "listing the installed nodes")
        sets = self._json(response, "listing the installed nodes")
        if not isinstance(sets, list):
            raise NodeRedError("listing the installed nodes: expected a JSON array", status=200)
        return [s for s in sets if isinstance(s, dict)]

    def list_node_types(self) -> set[str]:
        """Node types the runtime can create now: from enabled node sets that loaded cleanly."""
        types: set[str] = set()
        for node_set in self._node_sets():
            if node_set.get("enabled") is False or node_set.get("err"):
                continue
            types.update(t for t in node_set.get("types", []) if isinstance(t, str))
        return types

    def list_modules(self) -> dict[str, str]:
        """Installed node modules and their loaded versions (including Node-RED's own)."""
        modules: dict[str, str] = {}
        for node_set in self._node_sets():
            name, version = node_set.get("module"), node_set.get("version")
            if isinstance(name, str) and isinstance(version, str):
                modules[name] = version
        return modules

    def get_module(self, name: str) -> ModuleInfo | None:
        """One installed module, or None if Node-RED does not have it."""
        response = self._request("GET", f"/nodes/{name}", headers={"Accept": "application/json"})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._fail(response, f"reading module {name}")
        return self._module_info(self._json(response, f"reading module {name}"))

    @staticmethod
    def _module_info(body: Any) -> ModuleInfo:
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise NodeRedError(f"Node-RED described a module without a name: {body!r:.200}")
        types: set[str] = set()
        for node_set in body.get("nodes", []):
            if isinstance(node_set, dict):
                types.update(t for t in node_set.get("types", []) if isinstance(t, str))
        pending = body.get("pending_version")
        return ModuleInfo(
            name=body["name"],
            version=str(body.get("version", "")),
            types=frozenset(types),
            pending_version=pending if isinstance(pending, str) else None,
        )

    def install_module(self, name: str, version: str) -> ModuleInfo:
        """Install `name@version` through Node-RED's own npm (needs a registry it can reach)."""
        response = self._request(
            "POST",
            "/nodes",
            json={"module": name, "version": version},
            timeout=self._install_timeout,
        )
        if response.status_code != 200:
            raise self._fail(response, f"installing {name}@{version}")
        return self._module_info(self._json(response, f"installing {name}@{version}"))

    def install_tarball(self, path: Path) -> ModuleInfo:
        """Upload an `npm pack` tarball; Node-RED installs and hot-loads it, no registry needed.

        A module that is already loaded at another version is upgraded on disk only: the
        returned `pending_version` says a Node-RED restart is needed to run it.
        """
        with path.open("rb") as tarball:
            response = self._request(
                "POST",
                "/nodes",
                files={"tarball": (path.name, tarball, "application/gzip")},
                timeout=self._install_timeout,
            )
        if response.status_code != 200:
            raise self._fail(response, f"installing {path.name}")
        return self._module_info(self._json(response, f"installing {path.name}"))
