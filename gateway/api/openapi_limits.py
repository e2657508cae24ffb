"""The OpenAPI document states this gateway's configured limits, not only the models' own.

Some bounds are settings (the longest provisioning token, the longest tunnel): the models cannot
know them, so a document built from the models alone would promise a client that 40 days is a
fine token lifetime while this gateway refuses it. `document_limits` adds them as ``maximum`` to
the document FastAPI builds, once, when it is first asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from gateway.settings import GatewaySettings


def document_limits(app: FastAPI, settings: GatewaySettings) -> None:
    build: Callable[[], dict[str, Any]] = app.openapi
    limits = {
        ("ProvisioningTokenCreate", "ttl_seconds"): settings.provisioning_token_max_ttl,
        ("TunnelOpen", "ttl_seconds"): settings.tunnel_max_ttl,
        ("ApiTokenCreate", "ttl_seconds"): settings.api_token_max_ttl,
        ("_TokenLogin", "ttl_seconds"): settings.api_token_max_ttl,
    }

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            schemas = document.get("components", {}).get("schemas", {})
            for (model, field), maximum in limits.items():
                found = schemas.get(model, {}).get("properties", {}).get(field)
                if found is not None:
                    found["maximum"] = maximum
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
