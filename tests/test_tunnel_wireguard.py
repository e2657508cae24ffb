"""WireGuard building blocks of the support tunnel, proven with real packets.

A lab of network namespaces (hub, two devices, two engineers) joined by veth pairs; the hub and
every endpoint run real wireguard-go, the filters are real nftables. Engineers are plain WireGuard
clients brought up from the config the hub renders. Negative probes must end in a *timeout* (the
packet went into the tunnel and was dropped), next to a positive control on the same path.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from edge_agent.tunnel.endpoint import TunnelEndpoint
from edge_agent.tunnel.policy import TunnelPolicy, TunnelRefused
from gateway.tunnels.wireguard.hub import (
    HubTunnel,
    TunnelConflictError,
    TunnelHub,
    UnknownTunnelError,
)
from gateway.tunnels.wireguard.pool import (
    CGNAT_NETWORK,
    DEFAULT_NETWORK,
    AddressNotAssignableError,
    PoolExhaustedError,
    choose_address,
)
from provisioning.commands import InvalidArgs
from provisioning.files import write_private
from provisioning.nftables import nft_list_table
from provisioning.process import pid_alive
from provisioning.tunnel_command import TunnelOpenArgs
from provisioning.wireguard.config import WgConfigError, render_wg_quick
from provisioning.wireguard.keys import (
    WgKeyError,
    generate_keypair,
    normalize_key,
    public_key_from_private,
)
from provisioning.wireguard.tools import WgCommandError, link_exists, run_command
from provisioning.wireguard.wireguard_go import UAPI_DIR, WireGuardGo
from tests.support.netns import (
    Link,
    NetLab,
    http_get,
    leftover_namespaces,
    missing_requirements,
    nft_tables,
    ns_socket,
    tcp_probe,
)
from tests.support.node_red import node_red_executable
from tests.support.waiting import wait_for
from tests.support.wireguard import (
    AddressPool,
    HandshakeTimeoutError,
    engineer_config,
    parse_wg_quick,
    tunnel_stats,
    wait_for_handshake,
)

PORT_A, PORT_B, PORT_C = 8080, 2222, 9090
ECHO_PORT = 7000
NODE_RED_PORT = 1880
HUB_PORT = 51820
_REASON = missing_requirements()


# ------------------------------------------------------------------------------ pure parts


def test_python_keys_match_wg_pubkey() -> None:
    if subprocess.run(["which", "wg"], capture_output=True, check=False).returncode:
        pytest.skip("needs the wg command")
    for _ in range(5):
        pair = generate_keypair()
        out = subprocess.run(
            ["wg", "pubkey"], input=pair.private_key, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == pair.public_key
    made_by_wg = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True)
    wg_pub = subprocess.run(
        ["wg", "pubkey"], input=made_by_wg.stdout, capture_output=True, text=True, check=True
    )
    assert public_key_from_private(made_by_wg.stdout) == wg_pub.stdout.strip()
    assert pair.private_key not in repr(pair)


def test_bad_keys_and_configs_say_what_is_wrong() -> None:
    with pytest.raises(WgKeyError, match="device key is not valid base64"):
        normalize_key("not a key!", "device key")
    with pytest.raises(WgKeyError, match="decodes to 3 bytes"):
        normalize_key("YWJj")
    with pytest.raises(WgConfigError, match="no PrivateKey"):
        parse_wg_quick("[Interface]\nAddress = 10.0.0.2/32\n")
    with pytest.raises(WgConfigError, match="HOST:PORT"):
        render_wg_quick(
            private_key=generate_keypair().private_key,
            address=IPv4Interface("10.0.0.2/32"),
            peer_public_key=generate_keypair().public_key,
            endpoint="no-port",
            allowed_ips=[IPv4Network("10.0.0.1/32")],
        )


def test_engineer_config_round_trips_and_is_0600(tmp_path: Path) -> None:
    eng, hub = generate_keypair(), generate_keypair()
    text = render_wg_quick(
        private_key=eng.private_key,
        address=IPv4Interface("10.213.0.3/32"),
        peer_public_key=hub.public_key,
        endpoint="hub.example.com:51820",
        allowed_ips=[IPv4Network("10.213.0.2/32")],
        mtu=1280,
        persistent_keepalive=25,
    )
    config = parse_wg_quick(text)
    assert str(config.private_key) == eng.private_key
    assert config.mtu == 1280
    (peer,) = config.peers.values()
    assert str(peer.public_key) == hub.public_key
    assert (peer.endpoint_host, peer.endpoint_port) == ("hub.example.com", 51820)
    assert [str(a) for a in peer.allowed_ips] == ["10.213.0.2/32"]
    path = write_private(tmp_path / "engineer.conf", text)
    assert path.stat().st_mode & 0o777 == 0o600


def test_pool_is_pure_checked_and_quarantines() -> None:
    net = IPv4Network("10.9.0.0/29")  # hosts .1-.6, .1 is the hub
    assert not DEFAULT_NETWORK.overlaps(CGNAT_NETWORK)
    now = 1000.0
    assert choose_address(net, set(), {}, now) == IPv4Address("10.9.0.2")
    # Deterministic: the same inputs give the same answer.
    used = {IPv4Address("10.9.0.2"), IPv4Address("10.9.0.3")}
    assert choose_address(net, used, {}, now) == choose_address(net, used, {}, now)
    # A recently released address is skipped while a never-used one is free...
    released = {IPv4Address("10.9.0.2"): now - 1}
    assert choose_address(net, set(), released, now) == IPv4Address("10.9.0.3")
    # ...and never chosen inside its quarantine, even when it is the only one left.
    others = {IPv4Address(f"10.9.0.{i}") for i in range(3, 7)}
    with pytest.raises(PoolExhaustedError, match=r"quarantine.*free in 599s"):
        choose_address(net, others, released, now, quarantine=600)
    assert choose_address(net, others, released, now + 600, quarantine=600) == IPv4Address(
        "10.9.0.2"
    )

    clock = [now]
    pool = AddressPool(net, quarantine=600, clock=lambda: clock[0])
    got = [pool.allocate() for _ in range(5)]
    assert len(set(got)) == 5 and pool.hub_address not in got
    assert all(a not in (net.network_address, net.broadcast_address) for a in got)
    with pytest.raises(PoolExhaustedError, match=r"5 of 5 addresses of 10\.9\.0\.0/29 are in use"):
        pool.allocate()
    pool.release(got[0])
    with pytest.raises(PoolExhaustedError, match="quarantine"):
        pool.allocate()
    clock[0] += 601
    assert pool.allocate() == got[0]
    with pytest.raises(AddressNotAssignableError, match="is not assigned"):
        AddressPool(net).release("10.9.0.4")
    with pytest.raises(AddressNotAssignableError, match="hub's own address"):
        AddressPool(net).reserve("10.9.0.1")
    with pytest.raises(AddressNotAssignableError, match="not in the tunnel pool"):
        AddressPool(net).reserve("10.10.0.4")
    with pytest.raises(AddressNotAssignableError, match="already assigned"):
        AddressPool(net, in_use=[IPv4Address("10.9.0.4")]).reserve("10.9.0.4")


def _session(**over: object) -> TunnelOpenArgs:
    fields: dict[str, object] = {
        "tunnel_id": "t-policy",
        "device_ip": "10.213.0.2",
        "engineer_ip": "10.213.0.3",
        "hub_ip": "10.213.0.1",
        "hub_public_key": generate_keypair().public_key,
        "hub_endpoint": "198.18.0.1:51820",
        "ports": [PORT_A],
        "expires_at": time.time() + 60,
    }
    fields.update(over)
    return TunnelOpenArgs.parse(fields)


def test_owner_policy_refuses_more_than_allowed() -> None:
    policy = TunnelPolicy(allowed=True, allowed_ports=frozenset({PORT_A}), max_ttl=3600)
    policy.check(_session())
    with pytest.raises(TunnelRefused, match=r"ports \[22\] are not allowed"):
        policy.check(_session(ports=[PORT_A, 22]))
    with pytest.raises(TunnelRefused, match="exceeds the 3600s"):
        policy.check(_session(expires_at=time.time() + 7200))
    with pytest.raises(TunnelRefused, match="already expired"):
        policy.check(_session(expires_at=time.time() - 1))
    with pytest.raises(TunnelRefused, match="disabled on this machine"):
        TunnelPolicy().check(_session())
    with pytest.raises(ValueError, match="unknown tunnel policy settings"):
        TunnelPolicy.from_mapping({"allowed": True, "ports": [22]})
    assert TunnelPolicy.from_mapping({"allowed": True, "allowed_ports": [22]}).allowed_ports == {22}
    with pytest.raises(InvalidArgs, match="must be HOST:PORT"):
        _session(hub_endpoint="198.18.0.1")
    with pytest.raises(InvalidArgs, match="lacks"):
        TunnelOpenArgs.parse({"tunnel_id": "x"})
    with pytest.raises(InvalidArgs, match="all differ"):
        _session(engineer_ip="10.213.0.2")


# ------------------------------------------------------------------------------ the lab


@dataclass
class Lab:
    net: NetLab
    dev1: Link
    dev2: Link
    eng1: Link
    eng2: Link


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if _REASON is not None:
        pytest.skip(_REASON)
    net = NetLab()
    try:
        for role in ("hub", "dev1", "dev2", "eng1", "eng2"):
            net.add_namespace(role)
        built = Lab(
            net,
            net.connect("hub", "dev1"),
            net.connect("hub", "dev2"),
            net.connect("hub", "eng1"),
            net.connect("hub", "eng2"),
        )
        for role, ports in (("dev1", (PORT_A, PORT_B, PORT_C)), ("dev2", (PORT_A, PORT_C))):
            for port in ports:
                net.serve(role, port, body=f"{role}:{port}")
        net.serve("dev1", ECHO_PORT, mode="echo")
        net.serve("hub", PORT_A, body="hub")
        net.serve("eng1", PORT_A, body="eng1")
        yield built
    finally:
        prefix = net.prefix
        names = set(net.wg_names)
        net.close()
        # The lab cleans up after itself: no namespace, no UAPI socket of ours remains.
        assert leftover_namespaces(prefix) == []
        assert not [n for n in names if (UAPI_DIR / f"{n}.sock").exists()]


@pytest.fixture(scope="module")
def pool() -> AddressPool:
    return AddressPool("10.213.0.0/24", quarantine=600)


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as exits:
        yield exits


@pytest.fixture
def hub(lab: Lab, tmp_path: Path, stack: contextlib.ExitStack) -> TunnelHub:
    tunnel_hub = TunnelHub(
        tmp_path / "hub",
        interface=lab.net.ifname("hub"),
        listen_port=HUB_PORT,
        network="10.213.0.0/24",
        netns=lab.net.ns("hub"),
    )
    tunnel_hub.up()
    stack.callback(tunnel_hub.down)
    return tunnel_hub


@dataclass
class Opened:
    tunnel: HubTunnel
    session: TunnelOpenArgs
    endpoint: TunnelEndpoint
    eng_ns: str
    eng_iface: str
    eng_process: WireGuardGo
    config_path: Path


def open_tunnel(
    lab: Lab,
    hub: TunnelHub,
    pool: AddressPool,
    stack: contextlib.ExitStack,
    tmp_path: Path,
    *,
    tunnel_id: str,
    device: str = "dev1",
    engineer: str = "eng1",
    ports: frozenset[int] = frozenset({PORT_A}),
    agent_ports: frozenset[int] | None = None,
    ttl: float = 60.0,
    extra_allowed: tuple[IPv4Network, ...] = (),
    closed: list[tuple[str, str]] | None = None,
) -> Opened:
    """The whole open flow, in the order the gateway will drive it."""
    dev_link: Link = getattr(lab, device)
    eng_link: Link = getattr(lab, engineer)
    device_ip, engineer_ip = pool.allocate(), pool.allocate()
    eng_keys = generate_keypair()
    session = TunnelOpenArgs(
        tunnel_id=tunnel_id,
        device_ip=device_ip,
        engineer_ip=engineer_ip,
        hub_ip=hub.hub_ip,
        hub_public_key=hub.public_key,
        hub_endpoint=f"{dev_link.a_ip}:{HUB_PORT}",
        ports=agent_ports if agent_ports is not None else ports,
        expires_at=time.time() + ttl,
    )
    policy = TunnelPolicy(
        allowed=True, allowed_ports=frozenset({PORT_A, PORT_B, PORT_C, ECHO_PORT, NODE_RED_PORT})
    )
    endpoint = TunnelEndpoint(
        tmp_path / f"agent-{tunnel_id}",
        policy,
        interface=lab.net.ifname("dev"),
        netns=dev_link.b,
        on_close=(lambda s, reason: closed.append((s.tunnel_id, reason)))
        if closed is not None
        else None,
    )
    stack.callback(endpoint.close)
    device_key = endpoint.prepare(session)
    tunnel = HubTunnel(tunnel_id, device_key, eng_keys.public_key, device_ip, engineer_ip, ports)
    hub.add_tunnel(tunnel)  # before the device dials
    stack.callback(_remove_if_open, hub, tunnel_id)
    endpoint.connect()
    config = engineer_config(hub, tunnel_id, eng_keys.private_key, f"{eng_link.a_ip}:{HUB_PORT}")
    config_path = write_private(tmp_path / f"{tunnel_id}-engineer.conf", config)
    iface, process = lab.net.wg_client(engineer, config, extra_allowed=extra_allowed)
    stack.callback(process.stop)
    return Opened(tunnel, session, endpoint, eng_link.b, iface, process, config_path)


def _remove_if_open(hub: TunnelHub, tunnel_id: str) -> None:
    """Cleanup: close the hub side unless the test did (or took the hub down)."""
    if tunnel_id in hub.tunnels and link_exists(hub.interface, netns=hub.netns):
        hub.remove_tunnel(tunnel_id)


def drop_count(netns: str, table: str, chain: str) -> int:
    """Packets counted by the rules of one of our chains (all our counters sit on drop rules)."""
    items = nft_list_table("inet", table, netns=netns) or []
    return sum(
        expr["counter"]["packets"]
        for item in items
        if "rule" in item and item["rule"]["chain"] == chain
        for expr in item["rule"]["expr"]
        if isinstance(expr, dict) and isinstance(expr.get("counter"), dict)
        and "drop" in item["rule"]["expr"][-1]
    )  # fmt: skip


def probe_all(targets: list[tuple[str, IPv4Address, int]]) -> list[str]:
    """Several TCP probes at once (each blocked one costs its full timeout)."""
    with ThreadPoolExecutor(len(targets)) as pool:
        return list(pool.map(lambda t: tcp_probe(t[0], t[1], t[2], timeout=1.5), targets))


# ------------------------------------------------------------------------------ real packets


@pytest.mark.netns
@pytest.mark.skipif(_REASON is not None, reason=f"netns test: {_REASON}")
def test_engineer_reaches_only_its_device_on_allowed_ports(
    lab: Lab, hub: TunnelHub, pool: AddressPool, stack: contextlib.ExitStack, tmp_path: Path
) -> None:
    hub_dev_side = IPv4Network(f"{lab.dev1.a_ip}/32")
    # Tunnel 2 first, so engineer 1 can try to reach device 2 through its own tunnel.
    t2 = open_tunnel(
        lab, hub, pool, stack, tmp_path, tunnel_id="t-two", device="dev2", engineer="eng2",
        ports=frozenset({PORT_A}), agent_ports=frozenset({PORT_A, PORT_C}),
    )  # fmt: skip
    greedy = (
        IPv4Network(f"{t2.tunnel.device_ip}/32"),
        IPv4Network(f"{hub.hub_ip}/32"),
        hub_dev_side,
    )
    t1 = open_tunnel(
        lab, hub, pool, stack, tmp_path, tunnel_id="t-one",
        ports=frozenset({PORT_A, PORT_B}), agent_ports=frozenset({PORT_A}), extra_allowed=greedy,
    )  # fmt: skip
    eng1, eng2 = t1.eng_ns, t2.eng_ns
    dev1_ip, dev2_ip = t1.tunnel.device_ip, t2.tunnel.device_ip
    assert t1.config_path.stat().st_mode & 0o777 == 0o600

    # Allowed: each engineer reaches its own device on the allowed port, through the tunnel.
    assert wait_for(lambda: http_get(eng1, dev1_ip, PORT_A), 5, what="eng1 -> dev1") == (
        f"dev1:{PORT_A}"
    )
    assert wait_for(lambda: http_get(eng2, dev2_ip, PORT_A), 5, what="eng2 -> dev2") == (
        f"dev2:{PORT_A}"
    )
    # Liveness is the handshake age, from `wg show dump`, on both sides.
    stats = tunnel_stats(hub, "t-one")
    age = stats.device_handshake_age()
    assert age is not None and age < 10
    assert stats.bytes_from_device > 0 and stats.engineer is not None
    device_view = t1.endpoint.stats()
    assert device_view is not None and device_view.last_handshake is not None
    assert device_view.persistent_keepalive == 15

    # The hub's peers are one /32 each.
    peers = hub.peer_stats()
    assert peers[t1.tunnel.device_public_key].allowed_ips == (f"{dev1_ip}/32",)
    assert peers[t1.tunnel.engineer_public_key].allowed_ips == (f"{t1.tunnel.engineer_ip}/32",)

    # Only the hub interface forwards; the namespace-wide switch stays off.
    assert run_command(["sysctl", "-n", "net.ipv4.ip_forward"], netns=hub.netns).strip() == "0"

    # Denied, all probes dropped in the tunnel (timeout, not refused):
    hub_ns, dev1_ns, dev2_ns = hub.netns or "", t1.endpoint.netns or "", t2.endpoint.netns or ""
    agent1, agent2 = t1.endpoint.firewall.table, t2.endpoint.firewall.table
    results = probe_all(
        [
            (eng1, dev1_ip, PORT_B),  # hub allows B, the device's own filter does not
            (eng1, dev1_ip, PORT_C),  # neither allows C
            (eng2, dev2_ip, PORT_C),  # device 2 allows C, the hub does not
            (eng1, dev2_ip, PORT_A),  # another device's tunnel
            (eng1, hub.hub_ip, PORT_A),  # the hub itself
            (eng1, lab.dev1.a_ip, PORT_A),  # the hub's other address
            (t1.endpoint.netns or "", t1.tunnel.engineer_ip, PORT_A),  # device -> engineer
        ]
    )
    assert results == ["timeout"] * 7, results
    # ...each by the layer meant to: the hub forwards nothing outside a tunnel's rules and lets
    # nothing reach itself; device 1's own filter stopped B inbound and the connection outbound;
    # device 2's filter never saw C (the hub had dropped it).
    assert drop_count(hub_ns, hub.firewall.table, "hub_forward") > 0
    assert drop_count(hub_ns, hub.firewall.table, "hub_input") > 0
    assert drop_count(dev1_ns, agent1, "tunnel_in") > 0
    assert drop_count(dev1_ns, agent1, "tunnel_out") > 0
    assert drop_count(dev2_ns, agent2, "tunnel_in") == 0
    # Control: the hub's server is up (reachable outside the tunnel, from its own link).
    assert http_get(eng1, lab.eng1.a_ip, PORT_A) == "hub"

    # A compromised device drops its own filter: the hub still keeps it from opening connections
    # to the engineer; and the port only the device's filter blocked now opens (so it was that
    # filter, and the hub allowed B as configured).
    assert t1.endpoint.firewall.remove()
    after = probe_all(
        [(t1.endpoint.netns or "", t1.tunnel.engineer_ip, PORT_A), (eng1, dev1_ip, PORT_B)]
    )
    assert after == ["timeout", "open"], after

    # Conflicts are refused before anything changes.
    with pytest.raises(TunnelConflictError, match="already assigned"):
        hub.add_tunnel(
            HubTunnel(
                "t-three",
                generate_keypair().public_key,
                generate_keypair().public_key,
                dev1_ip,
                pool.allocate(),
                frozenset({PORT_A}),
            )
        )
    assert "t-three" not in hub.firewall.installed()


@contextlib.contextmanager
def node_red_in(netns: str, workdir: Path, port: int) -> Iterator[None]:
    """A real Node-RED listening on all addresses of a device namespace, stopped afterwards."""
    executable = node_red_executable()
    user_dir = workdir / "node-red"
    user_dir.mkdir(parents=True)
    settings = workdir / "node-red-settings.js"
    settings.write_text(
        "module.exports = "
        + json.dumps({"uiHost": "0.0.0.0", "flowFile": "flows.json", "credentialSecret": "t"})
        + ";\n"
    )
    argv = [str(executable), "--port", str(port), "--userDir", str(user_dir)]
    with (workdir / "node-red.log").open("wb") as log:
        process = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv, "--settings", str(settings)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: process.poll() is None and "Node-RED" in http_get(netns, "127.0.0.1", port),
            timeout=60,
            interval=0.2,
            what="Node-RED in the device namespace",
        )
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.mark.netns
@pytest.mark.nodered
@pytest.mark.skipif(_REASON is not None, reason=f"netns test: {_REASON}")
def test_engineer_opens_node_red_editor_through_tunnel(
    lab: Lab, hub: TunnelHub, pool: AddressPool, stack: contextlib.ExitStack, tmp_path: Path
) -> None:
    dev_ns = lab.net.ns("dev2")
    with node_red_in(dev_ns, tmp_path, NODE_RED_PORT):
        t = open_tunnel(
            lab, hub, pool, stack, tmp_path, tunnel_id="t-node-red", device="dev2",
            engineer="eng2", ports=frozenset({NODE_RED_PORT}),
        )  # fmt: skip
        page = wait_for(
            lambda: http_get(t.eng_ns, t.tunnel.device_ip, NODE_RED_PORT), 5, what="editor"
        )
        assert "<title>Node-RED</title>" in page
        # The editor's Admin API answers too (the engineer's actual work).
        flows = http_get(t.eng_ns, t.tunnel.device_ip, NODE_RED_PORT, path="/flows")
        assert json.loads(flows) == []
        t.endpoint.close()
        hub.remove_tunnel("t-node-red")
        assert tcp_probe(t.eng_ns, t.tunnel.device_ip, NODE_RED_PORT) == "timeout"
    assert lab.net.pids(dev_ns) == []


@pytest.mark.netns
@pytest.mark.skipif(_REASON is not None, reason=f"netns test: {_REASON}")
def test_close_removes_everything_and_quarantines_addresses(
    lab: Lab, hub: TunnelHub, pool: AddressPool, stack: contextlib.ExitStack, tmp_path: Path
) -> None:
    closed: list[tuple[str, str]] = []
    t = open_tunnel(lab, hub, pool, stack, tmp_path, tunnel_id="t-close", closed=closed)
    dev_ns = t.endpoint.netns or ""
    dev_iface = t.endpoint.interface
    wg_pid = t.endpoint.pid
    assert wg_pid is not None
    assert wait_for_handshake(hub, "t-close", 5).device_handshake_age() is not None
    assert wait_for(lambda: http_get(t.eng_ns, t.tunnel.device_ip, PORT_A), 5, what="tunnel up")
    assert f"inet {t.endpoint.firewall.table}" in nft_tables(dev_ns)
    assert not [p for p in (tmp_path / "agent-t-close").iterdir() if "key" in p.name]

    assert t.endpoint.close()
    final = hub.remove_tunnel("t-close")
    assert final.bytes_from_device > 0 and final.bytes_to_device > 0
    assert closed == [("t-close", "closed")]

    # No packet passes: the engineer's interface is still up and tries, and gets nothing.
    assert tcp_probe(t.eng_ns, t.tunnel.device_ip, PORT_A, timeout=1.5) == "timeout"
    # Device side: interface, process, socket, rules and state are gone.
    assert not link_exists(dev_iface, netns=dev_ns)
    assert not pid_alive(wg_pid)
    assert not (UAPI_DIR / f"{dev_iface}.sock").exists()
    assert f"inet {t.endpoint.firewall.table}" not in nft_tables(dev_ns)
    assert lab.net.pids(dev_ns) == []
    assert list((tmp_path / "agent-t-close").iterdir()) == [
        tmp_path / "agent-t-close" / f"{dev_iface}.log"
    ]
    # Hub side: exactly this tunnel's peers and rules are gone; the hub itself stays.
    peers = hub.peer_stats()
    assert t.tunnel.device_public_key not in peers and t.tunnel.engineer_public_key not in peers
    assert "t-close" not in hub.firewall.installed()
    assert str(t.tunnel.device_ip) not in str(hub.firewall._state()[1])
    assert link_exists(hub.interface, netns=hub.netns)

    # The addresses go back to the pool but are not handed out again at once.
    pool.release(t.tunnel.device_ip)
    pool.release(t.tunnel.engineer_ip)
    fresh = {pool.allocate(), pool.allocate()}
    assert not fresh & {t.tunnel.device_ip, t.tunnel.engineer_ip}
    for addr in fresh:
        pool.release(addr)
    assert not t.endpoint.close()  # idempotent


@pytest.mark.netns
@pytest.mark.skipif(_REASON is not None, reason=f"netns test: {_REASON}")
def test_device_side_ends_at_expiry_with_gateway_gone(
    lab: Lab, hub: TunnelHub, pool: AddressPool, stack: contextlib.ExitStack, tmp_path: Path
) -> None:
    t = open_tunnel(
        lab, hub, pool, stack, tmp_path, tunnel_id="t-expire", device="dev2", engineer="eng2",
        ttl=3.0,
    )  # fmt: skip
    assert wait_for(lambda: http_get(t.eng_ns, t.tunnel.device_ip, PORT_A), 3, what="tunnel up")
    hub.down()  # the gateway is gone
    # The agent restarts too: the old process's timer is gone, a new one recovers the session.
    assert t.endpoint._timer is not None
    t.endpoint._timer.cancel()
    closed: list[tuple[str, str]] = []
    agent = TunnelEndpoint(
        t.endpoint.state_dir,
        t.endpoint.policy,
        interface=t.endpoint.interface,
        netns=t.endpoint.netns,
        on_close=lambda s, reason: closed.append((s.tunnel_id, reason)),
    )
    stack.callback(agent.close)
    assert agent.recover() == t.session
    dev_ns, dev_iface, pid = agent.netns or "", agent.interface, agent.pid
    assert pid is not None and pid == t.endpoint.pid
    wait_for(lambda: not link_exists(dev_iface, netns=dev_ns), 8, what="device interface gone")
    assert time.time() >= t.session.expires_at - 0.1
    wait_for(lambda: closed == [("t-expire", "expired")], 3, what="expiry reported")
    assert time.time() < t.session.expires_at + 1.0  # by the timer, not the hard stop
    assert not pid_alive(pid)
    assert f"inet {agent.firewall.table}" not in nft_tables(dev_ns)
    assert agent.session is None
    assert lab.net.pids(dev_ns) == []


@pytest.mark.netns
@pytest.mark.skipif(_REASON is not None, reason=f"netns test: {_REASON}")
def test_tunnel_dies_at_expiry_even_if_agent_hangs(
    lab: Lab, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    """The process-level deadline: with the agent's timer dead, wireguard-go still ends."""
    policy = TunnelPolicy(allowed=True, allowed_ports=frozenset({PORT_A}))
    endpoint = TunnelEndpoint(
        tmp_path / "agent",
        policy,
        interface=lab.net.ifname("dev"),
        netns=lab.net.ns("dev1"),
        hard_stop_grace=0.5,
    )
    stack.callback(endpoint.close)
    session = _session(tunnel_id="t-hang", expires_at=time.time() + 1.0)
    endpoint.prepare(session)
    assert endpoint._timer is not None
    endpoint._timer.cancel()  # the agent hangs: its own timer never fires
    start = time.monotonic()
    wait_for(
        lambda: not link_exists(endpoint.interface, netns=endpoint.netns), 10, what="hard stop"
    )
    assert time.monotonic() - start >= 0.5
    # A restarted agent cleans up what is left (rules, state).
    restarted = TunnelEndpoint(
        tmp_path / "agent", policy, interface=endpoint.interface, netns=endpoint.netns
    )
    assert restarted.recover() is None
    assert not restarted.firewall.installed()
    assert not (tmp_path / "agent" / f"tunnel-{endpoint.interface}.json").exists()


@pytest.mark.netns
@pytest.mark.skipif(_REASON is not None, reason=f"netns test: {_REASON}")
def test_hub_restart_keeps_open_tunnel_working(
    lab: Lab, hub: TunnelHub, pool: AddressPool, stack: contextlib.ExitStack, tmp_path: Path
) -> None:
    t = open_tunnel(
        lab, hub, pool, stack, tmp_path, tunnel_id="t-restart", ports=frozenset({PORT_A, ECHO_PORT})
    )
    assert wait_for(lambda: http_get(t.eng_ns, t.tunnel.device_ip, PORT_A), 5, what="tunnel up")
    conn = ns_socket(t.eng_ns)
    conn.settimeout(3)
    stack.callback(conn.close)
    conn.connect((str(t.tunnel.device_ip), ECHO_PORT))
    conn.sendall(b"before\n")
    assert conn.recv(100) == b"before\n"
    # A tunnel the database no longer knows (closed while the gateway was down).
    stale = HubTunnel(
        "t-stale",
        generate_keypair().public_key,
        generate_keypair().public_key,
        pool.allocate(),
        pool.allocate(),
        frozenset({PORT_A}),
    )
    hub.add_tunnel(stale)
    pid, key = hub.pid, hub.public_key

    # The gateway process restarts: a new hub object on the same state dir adopts the interface.
    restarted = TunnelHub(
        hub.state_dir, interface=hub.interface, listen_port=HUB_PORT,
        network="10.213.0.0/24", netns=hub.netns,
    )  # fmt: skip
    restarted.up()
    report = restarted.restore([t.tunnel])
    assert restarted.pid == pid and restarted.public_key == key
    assert report.kept_peers == 2 and report.set_peers == 0 and report.removed_peers == 2
    assert report.kept_rules == ("t-restart",) and report.removed_rules == ("t-stale",)
    # The open connection carries on; new ones work; the stale tunnel is gone.
    conn.sendall(b"after\n")
    assert conn.recv(100) == b"after\n"
    assert http_get(t.eng_ns, t.tunnel.device_ip, PORT_A) == f"dev1:{PORT_A}"
    assert stale.device_public_key not in restarted.peer_stats()
    assert set(restarted.firewall.installed()) == {"t-restart"}

    # wireguard-go itself died: up() starts it with the same key, restore() puts peers back.
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), 5, what="hub wireguard-go killed")
    again = TunnelHub(
        hub.state_dir, interface=hub.interface, listen_port=HUB_PORT,
        network="10.213.0.0/24", netns=hub.netns,
    )  # fmt: skip
    again.up()
    report = again.restore([t.tunnel])
    assert again.pid != pid and again.public_key == key
    assert report.set_peers == 2 and report.kept_rules == ("t-restart",)
    assert set(again.peer_stats()) == {t.tunnel.device_public_key, t.tunnel.engineer_public_key}
    assert again.remove_tunnel("t-restart").tunnel_id == "t-restart"
    again.down()
    for addr in (stale.device_ip, stale.engineer_ip):
        pool.release(addr)


@pytest.mark.netns
@pytest.mark.skipif(_REASON is not None, reason=f"netns test: {_REASON}")
def test_offline_device_times_out_and_leaves_nothing(hub: TunnelHub, pool: AddressPool) -> None:
    tunnel = HubTunnel(
        "t-offline",
        generate_keypair().public_key,  # a device that never dials
        generate_keypair().public_key,
        pool.allocate(),
        pool.allocate(),
        frozenset({PORT_A}),
    )
    hub.add_tunnel(tunnel)
    with pytest.raises(HandshakeTimeoutError, match=r"no WireGuard handshake .* within 1s"):
        wait_for_handshake(hub, "t-offline", 1.0)
    hub.remove_tunnel("t-offline")
    assert hub.peer_stats() == {}
    assert hub.firewall.installed() == {}
    with pytest.raises(UnknownTunnelError, match="no open tunnel 't-offline'"):
        tunnel_stats(hub, "t-offline")
    for addr in (tunnel.device_ip, tunnel.engineer_ip):
        pool.release(addr)


@pytest.mark.netns
@pytest.mark.skipif(_REASON is not None, reason=f"netns test: {_REASON}")
def test_hub_that_cannot_come_up_leaves_nothing(
    lab: Lab, hub: TunnelHub, tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    second = TunnelHub(
        tmp_path / "second", interface=lab.net.ifname("hub"), listen_port=HUB_PORT,
        network="10.214.0.0/24", netns=hub.netns,
    )  # fmt: skip
    stack.callback(second.down)
    before = lab.net.pids("hub")
    with pytest.raises(WgCommandError, match="listen-port"):
        second.up()  # the first hub holds the UDP port
    assert second.pid is None
    assert lab.net.pids("hub") == before
    assert not link_exists(second.interface, netns=hub.netns)
    assert nft_tables(hub.netns or "") == [f"inet {hub.firewall.table}"]  # the first hub's
    assert hub.firewall.installed() == {}
    assert (tmp_path / "second" / f"{second.interface}.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.netns
@pytest.mark.skipif(_REASON is not None, reason=f"netns test: {_REASON}")
def test_owner_policy_refusal_brings_nothing_up(lab: Lab, tmp_path: Path) -> None:
    netns = lab.net.ns("dev1")
    before = nft_tables(netns)
    endpoint = TunnelEndpoint(
        tmp_path / "agent",
        TunnelPolicy(allowed=True, allowed_ports=frozenset({PORT_A})),
        interface=lab.net.ifname("dev"),
        netns=netns,
    )
    with pytest.raises(TunnelRefused, match=r"ports \[22\] are not allowed"):
        endpoint.prepare(_session(tunnel_id="t-refused", ports=[PORT_A, 22]))
    assert endpoint.session is None and endpoint.pid is None
    assert not link_exists(endpoint.interface, netns=netns)
    assert nft_tables(netns) == before
    assert lab.net.pids(netns) == []
    assert not (tmp_path / "agent").exists() or not list((tmp_path / "agent").iterdir())
