"""The device registry: machines, their owners, provisioning tokens, the audit log.

`models` holds the tables; `devices` enrollment, status and revocation (and the checks on device
JWTs); `machines` the machines as people look for them (names, tags, filters, health);
`ownership` who owns a machine (a customer or stock) and claim codes; `tokens` provisioning
tokens; `audit` the log of who did what; `schemas` what the HTTP API answers about them;
`status_listener` the online state from the retained MQTT status; `fleet_metrics` the fleet's
figures for /metrics. People, customers and their API tokens are in `gateway.accounts`.
"""
