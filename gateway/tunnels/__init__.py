"""Support tunnels, gateway side: records, the open/close flow, the hub runner and the reaper.

The WireGuard building blocks (pool rules, hub interface, nftables) are in `wireguard/`; the rest
of this package keeps the tunnels in the database and drives those blocks from it.
"""
