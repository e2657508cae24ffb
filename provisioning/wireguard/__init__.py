"""WireGuard pieces both sides share: keys, the `wg`/`ip`/`sysctl` tools, wg-quick configs,
wireguard-go.

The hub (gateway host) and the tunnel endpoint (device) drive the same tools, so the helpers live
here rather than being written twice. Keys and wg-quick files come from the PyPI
`wireguard-tools` package; changing a running interface goes through Debian's `wg` command, which
works the same on a kernel interface and on wireguard-go's UAPI socket. Every call is a
list-argument subprocess; private keys travel through 0600 files or stdin, never on a command
line, and are never logged. Nothing here imports FastAPI or SQLModel, so the agent uses it.

- `keys`: key pairs and 0600 key files;
- `tools`: running a tool (in a network namespace), `wg set`/`wg show dump`, `ip`, `sysctl`;
- `config`: the engineer's wg-quick file;
- `wireguard_go`: the supervised `wireguard-go` process and its UAPI socket.

`netns` arguments run the command inside that network namespace (`ip netns exec`); the tests use
this to build a hub, devices and engineers on one host without touching the host's own network.
"""
