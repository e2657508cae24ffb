"""The operator's HTTP client: one place that turns gateway answers into clear messages."""

from __future__ import annotations

from typing import Any

import httpx

from edgefleet.output import CommandError


class GatewayClient:
    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        if not base_url:
            raise CommandError(
                "no gateway given: set EDGEFLEET_GATEWAY=http://host:8080 or pass --gateway", 2
            )
        if not token:
            raise CommandError(
                "no API token given: set EDGEFLEET_TOKEN (from `edgefleet admin create-token`) "
                "or pass --token",
                2,
            )
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            # Every request goes to base_url (no redirects are followed): a plain-HTTP gateway
            # needs no TLS context, and loading the CA bundle for one took ~30 ms of CPU, a fifth
            # of a short command. Any other scheme is verified as always.
            verify=httpx.URL(self.base_url).scheme != "http",
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._client.request(method, "/api/v1" + path, **kwargs)
        except httpx.TransportError as exc:
            raise CommandError(f"cannot reach the gateway at {self.base_url}: {exc}") from exc
        if response.is_success:
            return response.json() if response.content else None
        raise CommandError(f"gateway said {response.status_code}: {_detail(response)}")

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI validation errors
        return "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', [])[1:])}: {e.get('msg')}" for e in detail
        )
    return str(detail)
