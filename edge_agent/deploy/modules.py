"""A `ModuleSource` that downloads node module tarballs from the gateway's module cache.

The agent never asks a public registry (air-gapped sites are normal): the deploy command, signed by
the gateway, names each module's tarball by sha256, the agent downloads it over HTTP with its own
JWT and refuses bytes that hash to anything else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import httpx

from edge_agent.deploy.deployer import ModuleUnavailable, tarball_name
from edge_agent.gateway_api import GatewayApi, GatewayApiError

__all__ = ["GatewayModuleSource"]


class GatewayModuleSource:
    """Tarballs from the gateway, verified against the sha256 the signed command gave."""

    def __init__(self, api: GatewayApi, hashes: Mapping[str, str], directory: Path) -> None:
        self._api = api
        self._hashes = dict(hashes)
        self._directory = directory

    def fetch(self, name: str, version: str) -> Path:
        ref = f"{name}@{version}"
        expected = self._hashes.get(ref)
        if expected is None:
            raise ModuleUnavailable(
                f"{ref} is not in the gateway's module cache (the deploy command names no "
                "tarball for it); add it with `edgefleet flows module add TARBALL` and deploy "
                "again"
            )
        try:
            data = self._api.request("GET", f"/agent/modules/{expected}").content
        except GatewayApiError as exc:
            raise ModuleUnavailable(f"the gateway refused {ref}: {exc.detail}") from exc
        except httpx.HTTPError as exc:
            raise ModuleUnavailable(f"cannot download {ref} from the gateway: {exc}") from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ModuleUnavailable(
                f"the tarball of {ref} from the gateway hashes to {actual}, not {expected} as "
                "the signed command says; it was not installed"
            )
        self._directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._directory / tarball_name(name, version)
        path.write_bytes(data)
        return path
