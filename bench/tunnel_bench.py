"""Support tunnel figures: time to open (p50/p95 over N opens), time to close, bulk throughput.

Builds three network namespaces (hub, device, engineer) with real wireguard-go and nftables, then
times the open flow the gateway will drive:

    device prepare (keys, wireguard-go, filter)  ->  hub add_tunnel  ->  device connect (dial)
    ->  engineer brings up the config the hub rendered  ->  first HTTP answer through the tunnel

and the close (device endpoint and hub peers/rules). For comparison it also times a few
"naive" opens in which the device dials before the hub knows its key (WireGuard retries the
handshake only after ~5 s). Finally it pushes a bulk TCP transfer through one tunnel.

The product path is timed too (`--product-opens`, default 20): a real `edgefleet gateway run
--tunnel-hub` in the hub namespace, a real `edgefleet agent run` in the device namespace, and the
engineer's `edgefleet tunnel open` (a fresh CLI process each time) -> engineer brings up the config
it wrote -> first HTTP answer; then `edgefleet tunnel close` and the device dropping its side.

Run as root from the repository root:  python -m bench.tunnel_bench [--opens 20] [--mb 200]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from edge_agent.tunnel.endpoint import TunnelEndpoint
from edge_agent.tunnel.policy import TunnelPolicy
from gateway.tunnels.wireguard.hub import HubTunnel, TunnelHub
from provisioning.tunnel_command import TunnelOpenArgs
from provisioning.wireguard.keys import generate_keypair
from tests.support.netns import NetLab, http_get, missing_requirements, ns_socket
from tests.support.tunnel_lab import TunnelLab
from tests.support.waiting import wait_for
from tests.support.wireguard import AddressPool, engineer_config

HTTP_PORT, SINK_PORT, HUB_PORT = 8080, 5001, 51820
NETWORK = "10.213.0.0/24"


@dataclass
class OpenTiming:
    prepare: float
    hub_add: float
    connect: float
    engineer_up: float
    first_answer: float
    total: float


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def _summary(values: list[float]) -> str:
    p50, p95 = _percentile(values, 50) * 1000, _percentile(values, 95) * 1000
    return f"p50 {p50:7.1f} ms   p95 {p95:7.1f} ms"


class Bench:
    def __init__(self, lab: NetLab, workdir: Path, mtu: int) -> None:
        self.mtu = mtu
        self.lab = lab
        self.workdir = workdir
        self.hub_link = lab.connect("hub", "dev")
        self.eng_link = lab.connect("hub", "eng")
        self.hub = TunnelHub(
            workdir / "hub",
            interface=lab.ifname("hub"),
            listen_port=HUB_PORT,
            network=NETWORK,
            mtu=mtu,
            netns=lab.ns("hub"),
        )
        self.pool = AddressPool(NETWORK, quarantine=0)
        self.policy = TunnelPolicy(allowed=True, allowed_ports=frozenset({HTTP_PORT, SINK_PORT}))
        self.count = 0

    def _session(self) -> TunnelOpenArgs:
        self.count += 1
        return TunnelOpenArgs(
            tunnel_id=f"bench-{self.count}",
            device_ip=self.pool.allocate(),
            engineer_ip=self.pool.allocate(),
            hub_ip=self.hub.hub_ip,
            hub_public_key=self.hub.public_key,
            hub_endpoint=f"{self.hub_link.a_ip}:{HUB_PORT}",
            ports=frozenset({HTTP_PORT, SINK_PORT}),
            expires_at=time.time() + 600,
            mtu=self.mtu,
        )

    def open(self, *, naive: bool = False) -> tuple[OpenTiming, TunnelEndpoint, str, object]:
        session = self._session()
        endpoint = TunnelEndpoint(
            self.workdir / f"agent-{session.tunnel_id}",
            self.policy,
            interface=self.lab.ifname("dev"),
            netns=self.lab.ns("dev"),
        )
        eng_keys = generate_keypair()
        t0 = time.perf_counter()
        # naive: the device dials before the hub knows its key
        device_key = endpoint.open(session) if naive else endpoint.prepare(session)
        t1 = time.perf_counter()
        tunnel = HubTunnel(
            session.tunnel_id,
            device_key,
            eng_keys.public_key,
            session.device_ip,
            session.engineer_ip,
            session.ports,
        )
        self.hub.add_tunnel(tunnel)
        t2 = time.perf_counter()
        if not naive:
            endpoint.connect()
        t3 = time.perf_counter()
        config = engineer_config(
            self.hub, session.tunnel_id, eng_keys.private_key, f"{self.eng_link.a_ip}:{HUB_PORT}"
        )
        _iface, process = self.lab.wg_client("eng", config)
        t4 = time.perf_counter()
        eng_ns = self.lab.ns("eng")
        wait_for(
            lambda: http_get(eng_ns, session.device_ip, HTTP_PORT, timeout=0.5),
            timeout=20,
            interval=0.01,
            what="first answer through the tunnel",
        )
        t5 = time.perf_counter()
        timing = OpenTiming(t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)
        return timing, endpoint, session.tunnel_id, process

    def close(self, endpoint: TunnelEndpoint, tunnel_id: str, process: object) -> float:
        session = endpoint.session
        assert session is not None
        t0 = time.perf_counter()
        endpoint.close()
        self.hub.remove_tunnel(tunnel_id)
        elapsed = time.perf_counter() - t0
        stop = getattr(process, "stop", None)
        if stop is not None:
            stop()  # the engineer's laptop, not part of the close
        self.pool.release(session.device_ip)
        self.pool.release(session.engineer_ip)
        return elapsed

    def throughput(self, megabytes: int) -> tuple[float, float]:
        timing, endpoint, tunnel_id, process = self.open()
        del timing
        session = endpoint.session
        assert session is not None
        chunk = b"\0" * (1 << 20)
        sock = ns_socket(self.lab.ns("eng"))
        sock.settimeout(60)
        with sock:
            sock.connect((str(session.device_ip), SINK_PORT))
            t0 = time.perf_counter()
            for _ in range(megabytes):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while data := sock.recv(64):
                answer += data
            elapsed = time.perf_counter() - t0
        received = int(answer or b"0")
        if received != megabytes * len(chunk):
            raise RuntimeError(f"sink received {received} bytes, sent {megabytes * len(chunk)}")
        self.close(endpoint, tunnel_id, process)
        return elapsed, megabytes * len(chunk) * 8 / elapsed / 1e6


@dataclass
class ProductTiming:
    cli_open: float  # `edgefleet tunnel open` ran (new process: interpreter start, HTTP, wait)
    gateway_open: float  # inside the gateway: tunnel recorded -> first handshake seen
    engineer_up: float
    first_answer: float
    total: float  # CLI started -> first HTTP answer through the tunnel
    cli_close: float  # `edgefleet tunnel close` ran (returns once the hub removed the peers)
    device_down: float  # close started -> the device's interface is gone


def product_bench(opens: int, workdir: Path) -> list[ProductTiming]:
    """The real gateway, agent and CLI; see the module docstring."""
    env = {"EDGEFLEET_TUNNEL_QUARANTINE": "0"}
    lab = TunnelLab(
        workdir, devices=("dev",), engineers=("eng",), network="10.213.9.0/24", gateway_env=env
    )
    timings: list[ProductTiming] = []
    try:
        lab.net.serve("dev", HTTP_PORT, body="device")
        lab.start_gateway()
        device = lab.enroll("dev", lab.hub_cli().json("token", "create")["token"])
        lab.start_agent("dev", [HTTP_PORT])
        lab.wait_agent_connected("dev")
        cli, eng_ns = lab.cli("eng"), lab.ns("eng")
        for index in range(opens):
            config = workdir / "eng" / f"open-{index}.conf"
            t0 = time.perf_counter()
            tunnel = cli.json(
                "tunnel", "open", device, "--port", str(HTTP_PORT), "--ttl", "10m", "-o", config
            )
            t1 = time.perf_counter()
            _iface, process = lab.net.wg_client("eng", config.read_text())
            t2 = time.perf_counter()
            wait_for(
                functools.partial(http_get, eng_ns, tunnel["device_ip"], HTTP_PORT, timeout=0.5),
                timeout=20,
                interval=0.01,
                what="first answer through the tunnel",
            )
            t3 = time.perf_counter()
            cli.run("tunnel", "close", tunnel["id"])
            t4 = time.perf_counter()
            wait_for(lambda: not lab.agent_tunnel_up("dev"), 20, 0.01, "device side down")
            t5 = time.perf_counter()
            process.stop()
            created = datetime.fromisoformat(tunnel["created_at"])
            opened = datetime.fromisoformat(tunnel["opened_at"])
            timings.append(
                ProductTiming(
                    cli_open=t1 - t0,
                    gateway_open=(opened - created).total_seconds(),
                    engineer_up=t2 - t1,
                    first_answer=t3 - t2,
                    total=t3 - t0,
                    cli_close=t4 - t3,
                    device_down=t5 - t3,
                )
            )
    finally:
        lab.close()
    return timings


def _print_product(timings: list[ProductTiming]) -> None:
    print(
        f"edgefleet tunnel open -> first answered request, {len(timings)} opens (real gateway "
        "with hub, real agent, CLI as a new process each time):"
    )
    for name in ("total", "cli_open", "gateway_open", "engineer_up", "first_answer"):
        print(f"  {name:<13} {_summary([getattr(t, name) for t in timings])}")
    print("edgefleet tunnel close:")
    for name in ("cli_close", "device_down"):
        print(f"  {name:<13} {_summary([getattr(t, name) for t in timings])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--opens", type=int, default=20)
    parser.add_argument("--naive", type=int, default=3, help="naive opens (device dials first)")
    parser.add_argument("--mb", type=int, default=200, help="megabytes for the bulk transfer")
    parser.add_argument("--mtu", type=int, default=1280, help="tunnel MTU (hub, device, engineer)")
    parser.add_argument(
        "--product-opens", type=int, default=20, help="opens through gateway, agent and CLI"
    )
    args = parser.parse_args(argv)
    reason = missing_requirements()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    with NetLab() as lab, tempfile.TemporaryDirectory(prefix="ef-tunnel-bench-") as tmp:
        for role in ("hub", "dev", "eng"):
            lab.add_namespace(role)
        bench = Bench(lab, Path(tmp), args.mtu)
        lab.serve("dev", HTTP_PORT, body="device")
        lab.serve("dev", SINK_PORT, mode="sink")
        bench.hub.up()
        try:
            opens: list[OpenTiming] = []
            closes: list[float] = []
            for _ in range(args.opens):
                timing, endpoint, tunnel_id, process = bench.open()
                opens.append(timing)
                closes.append(bench.close(endpoint, tunnel_id, process))
            naive: list[float] = []
            for _ in range(args.naive):
                timing, endpoint, tunnel_id, process = bench.open(naive=True)
                naive.append(timing.total)
                bench.close(endpoint, tunnel_id, process)
            seconds, mbit = bench.throughput(args.mb)
        finally:
            with contextlib.suppress(Exception):
                bench.hub.down()
    totals = [t.total for t in opens]
    print(f"tunnel open -> first answered request, {len(totals)} opens (device prepares,")
    print("hub adds peers, device dials, engineer brings up its config, HTTP GET answered):")
    print(f"  {_summary(totals)}   max {max(totals) * 1000:7.1f} ms")
    for name in ("prepare", "hub_add", "connect", "engineer_up", "first_answer"):
        values = [getattr(t, name) for t in opens]
        print(f"    {name:<13} median {statistics.median(values) * 1000:7.1f} ms")
    print(f"tunnel close (device endpoint + hub peers and rules), {len(closes)} closes:")
    print(f"  {_summary(closes)}")
    if naive:
        print(f"naive open (device dials before the hub knows its key), {len(naive)} opens:")
        print(f"  p50 {_percentile(naive, 50) * 1000:7.1f} ms   max {max(naive) * 1000:7.1f} ms")
    print(f"bulk TCP engineer -> device through one tunnel (MTU {args.mtu}): {args.mb} MiB in"
          f" {seconds:.2f} s"
          f" = {mbit:.0f} Mbit/s")  # fmt: skip
    if args.product_opens:
        with tempfile.TemporaryDirectory(prefix="ef-tunnel-bench-") as tmp:
            _print_product(product_bench(args.product_opens, Path(tmp)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
