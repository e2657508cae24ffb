"""Plugs telemetry into a gateway: the ingest, the maintenance job (partitions, compaction,
retention) and their metrics."""

from __future__ import annotations

import contextlib

from gateway.runtime import GatewayRuntime
from gateway.telemetry.ingest import IngestOptions, TelemetryIngest, default_client_id
from gateway.telemetry.maintenance import TelemetryMaintenance, prepare
from gateway.telemetry.metrics import TelemetryMetrics


def install(runtime: GatewayRuntime, stack: contextlib.ExitStack) -> TelemetryIngest:
    """Start ingest and maintenance (compaction, retention); ``stack`` stops them (ingest
    first in, last out)."""
    settings = runtime.settings
    endpoint = runtime.mqtt_endpoint()
    metrics = TelemetryMetrics(runtime.metrics)
    options = IngestOptions(
        client_id=default_client_id(settings.data_dir, settings.replica_name),
        session_expiry=settings.telemetry_session_expiry,
        receive_maximum=settings.telemetry_receive_maximum,
        max_series_per_device=settings.telemetry_max_series_per_device,
    )
    prepare(runtime.engine)
    ingest = TelemetryIngest(endpoint, runtime.listener_engine, runtime.topics, options, metrics)
    ingest.start()
    stack.callback(ingest.stop, leave=settings.telemetry_leave_on_stop)
    runtime.devices_first = lambda: ingest.behind(settings.http_yield_lag)
    maintenance = TelemetryMaintenance(
        runtime.engine,
        compact_after=settings.telemetry_compact_after,
        compact_pace=settings.telemetry_compact_pace,
        retention=settings.telemetry_retention,
        rollup_retention=settings.telemetry_rollup_retention,
        metrics=metrics,
        interval=settings.telemetry_compact_interval,
        retention_interval=settings.telemetry_retention_interval,
    )
    maintenance.start()
    stack.callback(maintenance.stop)
    return ingest
