"""The agent's HTTP client: every call carries a fresh short-lived JWT signed by the device key."""

from __future__ import annotations

from typing import Any

import httpx

from edge_agent.state import Identity
from provisioning.jwt_rules import sign_device_token


class GatewayApiError(RuntimeError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"gateway answered {status}: {detail}")
        self.status = status
        self.detail = detail


class GatewayApi:
    def __init__(self, identity: Identity, timeout: float = 30.0) -> None:
        self._identity = identity
        verify: str | bool = True
        if identity.gateway_url.startswith("https") and identity.ca_path:
            verify = str(identity.ca_path)
        self._client = httpx.Client(
            base_url=identity.gateway_url + "/api/v1", timeout=timeout, verify=verify
        )

    def _auth(self) -> dict[str, str]:
        token = sign_device_token(
            self._identity.private_key,
            self._identity.device_id,
            self._identity.enrollment.gateway_id,
        )
        return {"Authorization": f"Bearer {token}"}

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._client.request(method, path, headers=self._auth(), **kwargs)
        if response.is_error:
            try:
                detail = str(response.json().get("detail"))
            except ValueError:
                detail = response.text[:300]
            raise GatewayApiError(response.status_code, detail)
        return response

    def whoami(self) -> dict[str, Any]:
        data: dict[str, Any] = self.request("GET", "/agent/self").json()
        return data

    def close(self) -> None:
        self._client.close()
