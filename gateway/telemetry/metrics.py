"""Prometheus metrics of the gateway's telemetry path, on a registry the runtime owns.

prometheus-client's default registry is a process-wide global; every collector here is
registered on the `CollectorRegistry` handed in instead (`GatewayRuntime.metrics`), so two
gateways in one process (tests) or a restart never collide, and ``/metrics`` shows exactly
what this gateway registered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from provisioning.telemetry import REASONS

UNKNOWN_DEVICE: Final = "unknown_device"
"""Refusal reason of the gateway's own (beside the wire schema's): the topic names no active
device (never enrolled, revoked, or not a device id at all)."""
SERIES_LIMIT: Final = "series_limit"
"""A device sent a metric beyond its limit of distinct series: those samples are dropped (the
rest of the batch is stored), counted here once per batch."""
REFUSAL_REASONS: Final = frozenset(REASONS | {UNKNOWN_DEVICE, SERIES_LIMIT})

# Seconds; a commit of one write usually takes 1-50 ms, a stalled database much longer.
_WRITE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Seconds from a batch's newest sample to its commit: fine steps, to read percentiles from.
LAG_BUCKETS: Final = (
    *(n / 1000 for n in (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80)),
    *(0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1, 1.5, 2, 3, 5, 10, 30, 60, 300),
)


class TelemetryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.received = Counter(
            "edgefleet_telemetry_messages_received",
            "Telemetry messages taken from the broker (redeliveries included).",
            registry=registry,
        )
        self.batches = Counter(
            "edgefleet_telemetry_batches_stored",
            "Telemetry batches written to the database (each (device, seq) once).",
            registry=registry,
        )
        self.samples = Counter(
            "edgefleet_telemetry_samples_stored",
            "Samples written to the database.",
            registry=registry,
        )
        self.duplicates = Counter(
            "edgefleet_telemetry_batches_duplicate",
            "Batches received again after they were stored (redeliveries); not written again.",
            registry=registry,
        )
        self.refused = Counter(
            "edgefleet_telemetry_refused",
            "Telemetry messages refused, by reason (acknowledged and dropped: they can never "
            "become valid).",
            ["reason"],
            registry=registry,
        )
        for reason in sorted(REFUSAL_REASONS):
            self.refused.labels(reason=reason)
        self.write_seconds = Histogram(
            "edgefleet_telemetry_write_seconds",
            "Time to write and commit one group of batches.",
            buckets=_WRITE_BUCKETS,
            registry=registry,
        )
        self.lag = Histogram(
            "edgefleet_telemetry_lag_seconds",
            "From a batch's last sample (the device's clock) to its commit here: how far the "
            "stored telemetry trails the machines (publish, broker, queue and write).",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.write_errors = Counter(
            "edgefleet_telemetry_write_errors",
            "Database writes that failed (the messages stay unacknowledged and are retried).",
            registry=registry,
        )
        self.outstanding = Gauge(
            "edgefleet_telemetry_outstanding_messages",
            "Messages received from the broker and not acknowledged yet.",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "edgefleet_telemetry_queue_depth",
            "Messages waiting for the writer thread.",
            registry=registry,
        )
        self.connected = Gauge(
            "edgefleet_telemetry_connected",
            "1 while the ingest is connected to the broker.",
            registry=registry,
        )
        self.retention_deleted = Counter(
            "edgefleet_telemetry_retention_deleted",
            "Rows deleted one by one by telemetry retention (batch keys, very late raw samples), "
            "by table.",
            ["table"],
            registry=registry,
        )
        self.retention_dropped = Counter(
            "edgefleet_telemetry_retention_dropped",
            "Whole units dropped by telemetry retention (PostgreSQL partitions: raw windows, days "
            "of chunks, weeks of rollups), by table.",
            ["table"],
            registry=registry,
        )
        self.series_refused_samples = Counter(
            "edgefleet_telemetry_series_refused_samples",
            "Samples dropped because their device is at its limit of distinct series.",
            registry=registry,
        )
        self.compacted = Counter(
            "edgefleet_telemetry_compacted_samples",
            "Raw samples compacted into chunks.",
            registry=registry,
        )
        self.compaction_seconds = Counter(
            "edgefleet_telemetry_compaction_seconds",
            "Time spent compacting (seconds, all passes).",
            registry=registry,
        )
        self.maintenance_errors = Counter(
            "edgefleet_telemetry_maintenance_errors",
            "Compaction or retention passes that failed (tried again at the next pass).",
            registry=registry,
        )

    def watch(self, outstanding: Callable[[], float], queue_depth: Callable[[], float]) -> None:
        """Read the two gauges from the ingest at scrape time (no update on the hot path)."""
        self.outstanding.set_function(outstanding)
        self.queue_depth.set_function(queue_depth)

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample, e.g. ``value("batches_stored_total")``."""
        found = self.registry.get_sample_value(f"edgefleet_telemetry_{name}", labels)
        return found or 0.0

    def refused_count(self, reason: str) -> float:
        return self.value("refused_total", reason=reason)
