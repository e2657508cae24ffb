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
                "no API token given: log in (edgefleet login --gateway URL --email EMAIL), set "
                "EDGEFLEET_TOKEN or pass --token",
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

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, "/api/v1" + path, **kwargs)
        except httpx.TransportError as exc:
            raise CommandError(f"cannot reach the gateway at {self.base_url}: {exc}") from exc
        if response.is_success:
            return response
        raise CommandError(f"gateway said {response.status_code}: {_detail(response)}")

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        return response.json() if response.content else None

    def get_all(
        self, path: str, params: dict[str, Any] | None = None, limit: int | None = None
    ) -> list[Any]:
        """Every item of a paginated list (following X-Next-Cursor), or the first `limit`."""
        items: list[Any] = []
        query = dict(params or {})
        while True:
            query["limit"] = min(500, limit - len(items)) if limit else 500
            response = self._send("GET", path, params=query)
            items.extend(response.json())
            cursor = response.headers.get("X-Next-Cursor")
            if not cursor or (limit and len(items) >= limit):
                return items[:limit] if limit else items
            query["cursor"] = cursor

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
