"""The device registry: machines, provisioning and API tokens, the audit log.

`models` holds the tables, `devices` enrollment, status and revocation (and the checks on device
JWTs), `tokens` provisioning tokens and operator API tokens, `audit` the log of who did what,
`schemas` what the HTTP API answers about them, `status_listener` the devices' online state
from their retained MQTT status.
"""
