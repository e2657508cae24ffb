"""Telemetry on the gateway: ingest from MQTT, storage, compaction, queries, retention, metrics.

- `models`: the tables (batch keys, series, raw samples, chunks, rollups), SQLAlchemy Core on
  ``SQLModel.metadata``;
- `store`: bulk writes, exactly once per ``(device, seq)``; the per-device series limit;
- `ingest`: the shared-subscription consumer that acknowledges only what is committed;
- `active_devices`: which device ids may send (a small cache of the registry);
- `refusals`: refused messages logged once per device and reason;
- `codec`: encoded blocks of numbers (pcodec);
- `partitions`: chunk windows and PostgreSQL's partitions of them;
- `compaction`: closed windows of raw samples into chunks and rollups;
- `rollups`: per-minute and hourly count/min/max/sum;
- `queries`: latest values, bucketed ranges, CSV export, over raw and compacted samples;
- `retention`: drops whole windows, days of chunks and weeks of rollups;
- `maintenance`: the background job that runs compaction and retention on one replica;
- `metrics`: Prometheus counters of all of the above;
- `wiring`: starts ingest and maintenance in a running gateway.
"""
