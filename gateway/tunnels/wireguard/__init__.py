"""WireGuard building blocks of the hub: the address pool's rules, the hub interface, nftables.

`pool` decides addresses (pure functions; the gateway keeps the state in its database), `hub`
runs the hub interface with two peers per tunnel, `firewall` keeps its nftables table. They know
nothing of the database or MQTT: `gateway.tunnels.hub_runner` drives them from stored state.
"""
