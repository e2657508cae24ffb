"""Support tunnels end to end, in network namespaces, with every part real.

A real `edgefleet gateway run --tunnel-hub` runs in the hub namespace (its own Mosquitto, SQLite,
wireguard-go hub, nftables); real `edgefleet agent run` processes run in two device namespaces
(device 1 beside a real Node-RED); engineers use the real `edgefleet tunnel ...` commands in their
own namespaces and bring the config they got up with wireguard-go. A third machine is enrolled
but never runs (offline). Negative probes must end in a *timeout* (dropped inside the tunnel)
next to a positive control on the same path.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from gateway.identity import GatewayIdentity
from gateway.tunnels.wireguard.firewall import HubFirewall
from provisioning import keys
from provisioning.jwt_rules import sign_command
from provisioning.nftables import nft_list_table
from provisioning.wireguard.tools import wg_show_dump
from provisioning.wireguard.wireguard_go import UAPI_DIR, WireGuardGo
from tests.support.mosquitto import MqttProbe
from tests.support.netns import (
    http_get,
    in_netns,
    leftover_namespaces,
    missing_requirements,
    tcp_probe,
)
from tests.support.node_red import node_red_executable
from tests.support.tunnel_lab import HUB_PORT, PUBLIC_IP, Process, TunnelLab
from tests.support.waiting import wait_for
from tests.support.wireguard import parse_wg_quick

_REASON = missing_requirements()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(_REASON is not None, reason=f"netns test: {_REASON}"),
]

WEB, OTHER, NODE_RED, ENGINEER_SERVER = 8080, 9090, 1880, 7000
QUARANTINE = 2
OPEN_TIMEOUT = 2
# The short tunnel must outlive opening it and stopping the gateway (1.5 s at a load of 36 on two
# cores); the test checks that it did.
SHORT_TTL = 6


def start_node_red(lab: TunnelLab, workdir: Path) -> Process:
    """A real Node-RED editor in device 1's namespace, listening on all its addresses."""
    executable = node_red_executable()
    user_dir = workdir / "node-red"
    user_dir.mkdir()
    settings = workdir / "node-red-settings.js"
    config = {"uiHost": "0.0.0.0", "flowFile": "flows.json", "credentialSecret": "t"}
    settings.write_text("module.exports = " + json.dumps(config) + ";\n")
    argv = [str(executable), "--port", str(NODE_RED), "--userDir", str(user_dir)]
    argv += ["--settings", str(settings)]
    return Process(lab.ns("dev1"), argv, workdir / "node-red.log").start()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TunnelLab]:
    workdir = tmp_path_factory.mktemp("tunnels")
    env = {"EDGEFLEET_TUNNEL_QUARANTINE": str(QUARANTINE)}
    built = TunnelLab(workdir, gateway_env=env)
    prefix, names = built.net.prefix, built.net.wg_names
    node_red: Process | None = None
    try:
        node_red = start_node_red(built, workdir)
        built.start_gateway()
        token = built.hub_cli().json("token", "create", "--uses", "3")["token"]
        with ThreadPoolExecutor(3) as pool:  # three machines enrolling at once, one token
            enrolling = [
                pool.submit(built.enroll, "dev1", token),
                pool.submit(built.enroll, "dev2", token),
                pool.submit(built.enroll, "dev3", token, "hub"),  # enrolled, never runs: offline
            ]
        for enrolled in enrolling:
            enrolled.result()
        built.net.serve("dev1", WEB, body="dev1:web")
        built.net.serve("dev1", OTHER, body="dev1:other")
        built.net.serve("dev2", WEB, body="dev2:web")
        built.net.serve("eng1", ENGINEER_SERVER, body="eng1")
        built.start_agent("dev1", [NODE_RED, WEB], node_red=f"http://127.0.0.1:{NODE_RED}")
        built.start_agent("dev2", [WEB])
        built.wait_agent_connected("dev1")
        built.wait_agent_connected("dev2")

        def editor_up() -> bool:
            assert node_red is not None
            node_red.check_running()
            return "Node-RED" in http_get(built.ns("dev1"), "127.0.0.1", NODE_RED)

        wait_for(editor_up, timeout=60, interval=0.2, what="Node-RED in device 1")
        yield built
    finally:
        if node_red is not None:
            node_red.stop()
        built.close()
        # Everything made for the module is gone: namespaces (with their veths, interfaces,
        # routes and nftables tables), processes, wireguard-go's UAPI sockets.
        assert leftover_namespaces(prefix) == []
        assert not [n for n in names if (UAPI_DIR / f"{n}.sock").exists()]


@pytest.fixture(autouse=True)
def nothing_left_open(lab: TunnelLab) -> Iterator[None]:
    """Whatever a test leaves open (it failed half-way) is closed before the next one."""
    yield
    if lab.gateway is None or not lab.gateway.running:
        lab.start_gateway()
    for tunnel in lab.api("GET", "/tunnels"):
        lab.api("POST", f"/tunnels/{tunnel['id']}/close", json={"reason": "test cleanup"})


# ----------------------------------------------------------------------------------- helpers


@dataclass
class Engineer:
    role: str
    tunnel: dict[str, Any]
    config_path: Path
    process: WireGuardGo

    @property
    def device_ip(self) -> IPv4Address:
        return IPv4Address(self.tunnel["device_ip"])


def open_tunnel(
    lab: TunnelLab, engineer: str, device: str, ports: list[int], ttl: str = "2m"
) -> dict[str, Any]:
    args = ["tunnel", "open", lab.device_ids[device], "--ttl", ttl, "--reason", "ticket 4711"]
    for port in ports:
        args += ["--port", str(port)]
    config = lab.workdir / engineer / f"{device}.conf"
    tunnel: dict[str, Any] = lab.cli(engineer).json(*args, "-o", config)
    assert tunnel["state"] == "open" and tunnel["config_path"] == str(config)
    return tunnel


def engineer_up(
    lab: TunnelLab, engineer: str, tunnel: dict[str, Any], greedy: tuple[IPv4Network, ...] = ()
) -> Engineer:
    """Bring up the config the CLI wrote, optionally asking for more than the hub grants."""
    path = Path(tunnel["config_path"])
    _, process = lab.net.wg_client(engineer, path.read_text(), extra_allowed=greedy)
    return Engineer(engineer, tunnel, path, process)


def hub_peers(lab: TunnelLab) -> dict[str, Any]:
    return dict(wg_show_dump(lab.hub_interface, netns=lab.ns("hub")).peers)


def hub_chains(lab: TunnelLab) -> set[str]:
    return set(HubFirewall(lab.hub_interface, netns=lab.ns("hub")).installed())


def wireguard_processes(lab: TunnelLab, role: str) -> list[int]:
    found = []
    for pid in lab.net.pids(role):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"wireguard-go" in cmdline:
            found.append(pid)
    return found


def device_side_gone(lab: TunnelLab, role: str) -> bool:
    table = f"edgefleet_agent_{lab.agent_interfaces[role]}"
    return (
        not lab.agent_tunnel_up(role)
        and nft_list_table("inet", table, netns=lab.ns(role)) is None
        and not wireguard_processes(lab, role)
    )


def answers(netns: str, host: IPv4Address | str, port: int, path: str = "/") -> str:
    """The body a server gives through the tunnel (retried briefly: a loaded host is slow)."""
    body: str = wait_for(lambda: http_get(netns, host, port, path=path), 10, what=f"{host}:{port}")
    return body


def probe_all(targets: list[tuple[str, IPv4Address | str, int]]) -> list[str]:
    with ThreadPoolExecutor(len(targets)) as pool:
        return list(pool.map(lambda t: tcp_probe(t[0], t[1], t[2], timeout=1.5), targets))


def tunnel_row(lab: TunnelLab, tunnel_id: str) -> dict[str, Any]:
    row: dict[str, Any] = lab.api("GET", f"/tunnels/{tunnel_id}")
    return row


def audit_actions(lab: TunnelLab, device: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = lab.api("GET", "/audit", params={"target": device})
    return events


# ------------------------------------------------------------------------------------- tests


def test_engineer_reaches_only_the_allowed_ports_of_its_device_until_close(
    lab: TunnelLab,
) -> None:
    dev1_ns = lab.ns("dev1")
    # A second device with its own tunnel and engineer, so engineer 1 can try to reach it.
    other = engineer_up(lab, "eng2", open_tunnel(lab, "eng2", "dev2", [WEB]))
    opened = open_tunnel(lab, "eng1", "dev1", [NODE_RED, WEB])
    hub_ip = IPv4Address(opened["hub_ip"])
    hub_side = lab.links["dev1"].a_ip  # the hub's address on device 1's link
    greedy = tuple(IPv4Network(f"{ip}/32") for ip in (other.device_ip, hub_ip, hub_side))
    eng = engineer_up(lab, "eng1", opened, greedy)
    eng1_ns = lab.ns("eng1")

    # The config: 0600, the engineer's own key, only the device routed through the hub.
    assert eng.config_path.stat().st_mode & 0o777 == 0o600
    config = parse_wg_quick(eng.config_path.read_text())
    assert str(config.private_key.public_key()) == opened["engineer_public_key"]
    (peer,) = config.peers.values()
    assert (str(peer.endpoint_host), peer.endpoint_port) == (PUBLIC_IP, HUB_PORT)
    assert [str(a) for a in peer.allowed_ips] == [f"{opened['device_ip']}/32"]
    # The hub holds exactly this tunnel's two peers, one /32 each.
    peers = hub_peers(lab)
    assert peers[opened["engineer_public_key"]].allowed_ips == (f"{opened['engineer_ip']}/32",)
    dev_peer = next(p for p in peers.values() if p.allowed_ips == (f"{opened['device_ip']}/32",))
    assert dev_peer.last_handshake is not None  # the open returned after the first handshake

    # Allowed: the real Node-RED editor and the other allowed port, through the tunnel.
    page = wait_for(lambda: http_get(eng1_ns, eng.device_ip, NODE_RED), 5, what="the editor")
    assert "<title>Node-RED</title>" in page
    assert json.loads(http_get(eng1_ns, eng.device_ip, NODE_RED, path="/flows")) == []
    assert answers(eng1_ns, eng.device_ip, WEB) == "dev1:web"
    assert answers(lab.ns("eng2"), other.device_ip, WEB) == "dev2:web"

    # Denied, each dropped inside the tunnel: a port not asked for, another device, the hub's
    # own addresses (where the gateway's HTTP API listens), and the device calling the engineer.
    results = probe_all(
        [
            (eng1_ns, eng.device_ip, OTHER),
            (eng1_ns, other.device_ip, WEB),
            (eng1_ns, hub_ip, 8080),
            (eng1_ns, hub_side, 8080),
            (dev1_ns, IPv4Address(opened["engineer_ip"]), ENGINEER_SERVER),
        ]
    )
    assert results == ["timeout"] * 5, results
    # Controls: those servers answer outside the tunnel.
    assert answers(dev1_ns, "127.0.0.1", OTHER) == "dev1:other"
    assert "ok" in answers(eng1_ns, lab.links["eng1"].a_ip, 8080, path="/healthz")

    # `tunnel list` shows it open, with time left and a fresh handshake.
    table = lab.cli("eng1").run("tunnel", "list").stdout
    line = next(row for row in table.splitlines() if row.startswith(opened["id"]))
    assert " open " in line and " in 1m" in line and "s ago" in line
    before = lab.api("GET", "/tunnels/pool")
    events = [e["action"] for e in audit_actions(lab, lab.device_ids["dev1"])]
    assert "tunnel.open" in events and "tunnel.handshake" in events

    # Close: no packet passes, peers and rules are gone on the hub, the device drops its side.
    closed = lab.cli("eng1").run("tunnel", "close", opened["id"], "--reason", "fixed").stdout
    assert f"tunnel {opened['id']} is closed" in closed
    assert tcp_probe(eng1_ns, eng.device_ip, WEB, timeout=1.5) == "timeout"
    peers = hub_peers(lab)
    assert opened["engineer_public_key"] not in peers
    assert f"{opened['device_ip']}/32" not in {ip for p in peers.values() for ip in p.allowed_ips}
    assert opened["id"] not in hub_chains(lab) and other.tunnel["id"] in hub_chains(lab)
    wait_for(lambda: device_side_gone(lab, "dev1"), 20, what="device 1's side removed")
    assert wait_for(lambda: tunnel_row(lab, opened["id"])["device_closed_at"], 20)
    (event,) = [
        e for e in audit_actions(lab, lab.device_ids["dev1"]) if e["action"] == "tunnel.close"
    ]
    assert event["detail"]["why"] == "fixed" and event["detail"]["bytes_from_device"] > 0
    # Its two addresses leave the pool's use, and are free again once their quarantine is over
    # (that they are not handed out before is proven with a long quarantine in the API tests).
    assert lab.api("GET", "/tunnels/pool")["in_use"] == before["in_use"] - 2
    wait_for(
        lambda: lab.api("GET", "/tunnels/pool")["free"] == before["free"] + 2,
        QUARANTINE + 10,
        what="the addresses free after the quarantine",
    )

    eng.process.stop()
    lab.cli("eng2").run("tunnel", "close", other.tunnel["id"])
    other.process.stop()
    wait_for(lambda: device_side_gone(lab, "dev2"), 20, what="device 2's side removed")
    assert hub_peers(lab) == {} and hub_chains(lab) == set()


def test_owner_refusal_and_bad_commands_bring_nothing_up(lab: TunnelLab) -> None:
    # Device 2's owner allows only the web port: asking for SSH too is refused as a whole.
    args = ["tunnel", "open", lab.device_ids["dev2"], "--port", str(WEB), "--port", "22"]
    done = lab.cli("eng2").run(*args, check=False)
    assert done.returncode != 0
    assert "the device refused: ports [22] are not allowed" in done.stderr
    assert "the owner allows [8080]" in done.stderr and "Nothing was left open" in done.stderr
    assert device_side_gone(lab, "dev2") and hub_peers(lab) == {}

    # Commands that are forged, expired or meant for another machine are refused by the agent.
    identity = GatewayIdentity.load_or_create(lab.data_dir / "signing-key.pem")
    device = lab.device_ids["dev1"]
    hub = lab.api("GET", "/tunnels/pool")["hub"]
    args_ok = {
        "tunnel_id": "t-injected",
        "device_ip": "10.213.7.13",
        "engineer_ip": "10.213.7.14",
        "hub_ip": "10.213.7.1",
        "hub_public_key": hub["public_key"],
        "hub_endpoint": hub["endpoint"],
        "ports": [WEB],
        "expires_at": time.time() + 60,
    }

    def sign(**over: Any) -> str:
        params: dict[str, Any] = {
            "gateway_id": identity.gateway_id,
            "device_id": device,
            "kind": "tunnel.open",
            "args": args_ok,
            "lifetime": 60,
        }
        params.update(over)
        key = params.pop("key", identity.private_key)
        return sign_command(key, **params)[1]

    probe = MqttProbe(lab.broker_endpoint(), f"e2e-{os.getpid()}")
    in_netns(lab.ns("hub"), probe.connect)
    try:
        assert not probe.subscribe("$share/e2e/fleet/+/reply").is_failure

        def replies() -> list[dict[str, Any]]:
            return [json.loads(p) for p in probe.received(f"fleet/{device}/reply")]

        bad = [
            sign(key=keys.generate_private_key()),
            sign(now=0),
            sign(device_id=lab.device_ids["dev2"]),
        ]
        for token in bad:
            assert not probe.publish(f"fleet/{device}/cmd", token).is_failure
        refused = wait_for(
            lambda: (r := [x for x in replies() if x["state"] == "refused"]) and len(r) >= 3 and r,
            10,
            what="three refusals",
        )
        reasons = sorted(r["detail"].split(":")[0] for r in refused)
        assert reasons == ["bad_signature", "expired", "wrong_audience"]
        assert device_side_gone(lab, "dev1")

        # A genuine open is run once; sent again (a replay) it is not run again.
        genuine = sign()
        assert not probe.publish(f"fleet/{device}/cmd", genuine).is_failure
        wait_for(lambda: lab.agent_tunnel_up("dev1"), 20, what="the genuine open")
        closing = sign(kind="tunnel.close", args={"tunnel_id": "t-injected", "reason": "test"})
        assert not probe.publish(f"fleet/{device}/cmd", closing).is_failure
        wait_for(lambda: device_side_gone(lab, "dev1"), 20, what="the close")
        answered = len(replies())
        assert not probe.publish(f"fleet/{device}/cmd", genuine).is_failure
        wait_for(lambda: len(replies()) > answered, 20, what="the replay answered")
        assert "seen before" in lab.agents["dev1"].log_path.read_text()
        assert device_side_gone(lab, "dev1")
    finally:
        probe.close()


def test_offline_device_open_fails_after_a_bounded_wait_and_leaves_nothing(
    lab: TunnelLab,
) -> None:
    before = lab.api("GET", "/tunnels/pool")
    started = time.monotonic()
    done = lab.cli("eng1").run(
        "tunnel",
        "open",
        lab.device_ids["dev3"],
        "--port",
        str(WEB),
        "--wait",
        f"{OPEN_TIMEOUT}s",
        check=False,
    )
    waited = time.monotonic() - started
    assert done.returncode != 0, done.stdout
    assert OPEN_TIMEOUT <= waited < OPEN_TIMEOUT + 10
    assert f"did not answer within {OPEN_TIMEOUT}s" in done.stderr
    assert "offline or its agent is not running" in done.stderr
    assert "Nothing was left open" in done.stderr
    assert not list((lab.workdir / "eng1").glob("t-*.conf"))  # no config for a failed open
    (failed,) = lab.api(
        "GET", "/tunnels", params={"include_closed": True, "device_id": lab.device_ids["dev3"]}
    )
    assert failed["state"] == "failed" and failed["failure"] == "device_offline"
    after = lab.api("GET", "/tunnels/pool")
    assert after["in_use"] == before["in_use"]
    assert failed["id"] not in hub_chains(lab) and hub_peers(lab) == {}


def test_gateway_restart_keeps_tunnels_and_expiry_holds_on_both_sides(lab: TunnelLab) -> None:
    """Device 2's tunnel outlives a gateway restart; device 1's expires while the gateway is
    stopped: the agent drops its side on its own, and the restarted gateway closes the hub's."""
    lasting = engineer_up(lab, "eng2", open_tunnel(lab, "eng2", "dev2", [WEB], ttl="2m"))
    short = engineer_up(lab, "eng1", open_tunnel(lab, "eng1", "dev1", [WEB], ttl=f"{SHORT_TTL}s"))
    eng1_ns, eng2_ns = lab.ns("eng1"), lab.ns("eng2")
    assert answers(eng1_ns, short.device_ip, WEB) == "dev1:web"
    assert answers(eng2_ns, lasting.device_ip, WEB) == "dev2:web"

    assert lab.stop_gateway() == 0
    expires_at = datetime.fromisoformat(short.tunnel["expires_at"].replace("Z", "+00:00"))
    assert datetime.now(UTC) < expires_at, "the short tunnel ended before the gateway stopped"
    hub_pid = int((lab.data_dir / "tunnel-hub" / f"{lab.hub_interface}.pid").read_text())
    # The hub's wireguard-go is not the gateway's child: tunnels keep working meanwhile.
    assert hub_pid in lab.net.pids("hub")
    assert answers(eng2_ns, lasting.device_ip, WEB) == "dev2:web"
    # The short tunnel expires on the device with no gateway around.
    wait_for(lambda: device_side_gone(lab, "dev1"), 20, what="device 1's side expired")
    assert tcp_probe(eng1_ns, short.device_ip, WEB, timeout=1.5) == "timeout"
    assert "expired" in lab.agents["dev1"].log_path.read_text()

    lab.start_gateway()
    # Adopted, not restarted: the same wireguard-go, and the lasting tunnel still answers
    # through the engineer's unchanged config.
    assert int((lab.data_dir / "tunnel-hub" / f"{lab.hub_interface}.pid").read_text()) == hub_pid
    assert answers(eng2_ns, lasting.device_ip, WEB) == "dev2:web"
    assert tunnel_row(lab, lasting.tunnel["id"])["state"] == "open"
    # The restarted gateway's reaper ends the expired one on the hub too.
    expired = wait_for(
        lambda: (t := tunnel_row(lab, short.tunnel["id"]))["state"] == "expired" and t,
        10,
        what="the expired tunnel reaped",
    )
    assert expired["closed_by"] == "gateway"
    assert short.tunnel["id"] not in hub_chains(lab)
    assert short.tunnel["engineer_public_key"] not in hub_peers(lab)
    actions = [e["action"] for e in audit_actions(lab, lab.device_ids["dev1"])]
    assert "tunnel.expire" in actions
    assert lab.api("GET", "/tunnels/pool")["in_use"] == 2  # only the lasting tunnel's pair

    lab.cli("eng2").run("tunnel", "close", lasting.tunnel["id"])
    for engineer in (short, lasting):
        engineer.process.stop()
    assert hub_chains(lab) == set()
