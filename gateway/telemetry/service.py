"""Starts the gateway's telemetry parts (ingest, retention, their metrics) for `gateway run`."""

from __future__ import annotations

import contextlib

from gateway.broker.mqtt_url import MqttEndpoint
from gateway.runtime import GatewayRuntime
from gateway.telemetry.ingest import IngestOptions, TelemetryIngest, default_client_id
from gateway.telemetry.metrics import TelemetryMetrics
from gateway.telemetry.retention import RetentionJob


def start_telemetry(
    runtime: GatewayRuntime, endpoint: MqttEndpoint, stack: contextlib.ExitStack
) -> TelemetryIngest:
    """Start ingest and retention; ``stack`` stops them (ingest first in, last out)."""
    settings = runtime.settings
    metrics = TelemetryMetrics(runtime.metrics)
    options = IngestOptions(
        client_id=default_client_id(settings.data_dir, settings.replica_name),
        session_expiry=settings.telemetry_session_expiry,
        receive_maximum=settings.telemetry_receive_maximum,
    )
    ingest = TelemetryIngest(endpoint, runtime.listener_engine, runtime.topics, options, metrics)
    ingest.start()
    stack.callback(ingest.stop, leave=settings.telemetry_leave_on_stop)
    runtime.devices_first = lambda: ingest.behind(settings.http_yield_lag)
    retention = RetentionJob(
        runtime.engine,
        settings.telemetry_retention,
        metrics,
        interval=settings.telemetry_retention_interval,
    )
    retention.start()
    stack.callback(retention.stop)
    return ingest
