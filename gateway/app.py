"""The FastAPI application."""

from __future__ import annotations

from fastapi import FastAPI

from gateway.api.errors import BodySizeLimit, install_error_handlers
from gateway.api.routes_accounts import router as accounts_router
from gateway.api.routes_broker_hooks import router as broker_hooks_router
from gateway.api.routes_devices import router as devices_router
from gateway.api.routes_flows import router as flows_router
from gateway.api.routes_metrics import router as metrics_router
from gateway.api.routes_registry import router as registry_router
from gateway.api.routes_telemetry import router as telemetry_router
from gateway.api.routes_tunnels import router as tunnels_router
from gateway.runtime import GatewayRuntime


def create_app(runtime: GatewayRuntime) -> FastAPI:
    app = FastAPI(
        title="edgefleet gateway",
        version="0.1.0",
        description="Device registry, telemetry, flow rollouts and support tunnels for a fleet "
        "of machines running Node-RED. People authenticate with a browser session (POST "
        "/api/v1/auth/login; changes carry the session's CSRF token) or their own API token, "
        "machines with short-lived ES256 JWTs signed by their own key. Lists are paginated: "
        "?limit= and ?cursor= from the X-Next-Cursor header.",
    )
    app.state.runtime = runtime
    install_error_handlers(app)
    app.include_router(accounts_router)
    app.include_router(registry_router)
    app.include_router(devices_router)
    app.include_router(telemetry_router)
    app.include_router(metrics_router)
    app.include_router(flows_router)
    app.include_router(tunnels_router)
    if runtime.settings.broker_kind == "emqx":
        app.include_router(broker_hooks_router)

    @app.get("/healthz", tags=["ops"], summary="Liveness: the process answers")
    def healthz() -> dict[str, str | bool]:
        """`leader`: whether this replica runs the singleton jobs right now."""
        leader = runtime.jobs.is_leader if runtime.jobs is not None else False
        return {"status": "ok", "gateway_id": runtime.identity.gateway_id, "leader": leader}

    app.add_middleware(
        BodySizeLimit,
        max_bytes=runtime.settings.max_request_bytes,
        overrides={
            "/api/v1/flows/modules": runtime.settings.max_module_bytes,
            "/api/v1/flows/releases": runtime.settings.max_release_request_bytes,
        },
    )
    return app
