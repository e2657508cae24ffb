"""Telemetry, device side: the outbox, the local intake, host metrics and the sender.

`component` puts them together as one agent component: `outbox` keeps every sample on disk until
the broker acknowledged it, `intake` is the loopback HTTP endpoint Node-RED posts to,
`host_metrics` samples CPU, memory and disk, `sender` publishes the outbox's batches.
"""
