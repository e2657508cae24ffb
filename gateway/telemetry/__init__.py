"""Telemetry on the gateway: ingest from MQTT, storage, queries, retention and metrics.

- `models`: the tables (batch keys, series, samples), SQLAlchemy Core on ``SQLModel.metadata``;
- `store`: bulk writes, exactly once per ``(device, seq)``;
- `ingest`: the shared-subscription consumer that acknowledges only what is committed;
- `active_devices`: which device ids may send (a small cache of the registry);
- `refusals`: refused messages logged once per device and reason;
- `queries`: latest values, bucketed ranges, CSV export;
- `retention`: deletes old samples in small chunks;
- `metrics`: Prometheus counters of all of the above;
- `wiring`: starts ingest and retention in a running gateway.
"""
