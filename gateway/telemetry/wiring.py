"""Plugs telemetry into a gateway: the ingest, the retention job and their metrics."""

from __future__ import annotations

import contextlib

from gateway.runtime import GatewayRuntime
from gateway.telemetry.ingest import IngestOptions, TelemetryIngest, default_client_id
from gateway.telemetry.metrics import TelemetryMetrics
from gateway.telemetry.retention import RetentionJob


def install(runtime: GatewayRuntime, stack: contextlib.ExitStack) -> TelemetryIngest:
    """Start ingest and retention; ``stack`` stops them (ingest first in, last out)."""
    settings = runtime.settings
    endpoint = runtime.mqtt_endpoint()
    metrics = TelemetryMetrics(runtime.metrics)
    options = IngestOptions(
        client_id=default_client_id(settings.data_dir, settings.replica_name),
        session_expiry=settings.telemetry_session_expiry,
        receive_maximum=settings.telemetry_receive_maximum,
    )
    ingest = TelemetryIngest(endpoint, runtime.engine, runtime.topics, options, metrics)
    ingest.start()
    stack.callback(ingest.stop, leave=settings.telemetry_leave_on_stop)
    retention = RetentionJob(
        runtime.engine,
        settings.telemetry_retention,
        metrics,
        interval=settings.telemetry_retention_interval,
    )
    retention.start()
    stack.callback(retention.stop)
    return ingest
