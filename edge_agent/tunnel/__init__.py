"""Support tunnels, device side: the commands, the owner's policy, the WireGuard endpoint, a filter.

`handler` answers `tunnel.open`, `tunnel.connect` and `tunnel.close`; `policy` is the machine
owner's word on what may be opened; `endpoint` brings the session's WireGuard interface up and
down (with its hard expiry); `firewall` is the local nftables filter. Imports only
`provisioning`, never `gateway`.
"""
