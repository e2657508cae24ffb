"""The agent's tunnel commands without a network: what is refused is refused before anything of
WireGuard or nftables is touched, and an agent that never had a tunnel starts without them.

The tools are taken off PATH, so any attempt to run `wg`, `nft`, `ip` or `wireguard-go` would
fail loudly; the real bring-up is proven in tests/test_tunnels_e2e.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.tunnel.endpoint import TunnelEndpoint
from edge_agent.tunnel.handler import TunnelCommands
from edge_agent.tunnel.policy import TunnelPolicy
from provisioning.jwt_rules import Command
from provisioning.wireguard.keys import generate_keypair


@pytest.fixture
def no_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def commands(tmp_path: Path, policy: TunnelPolicy) -> TunnelCommands:
    return TunnelCommands(TunnelEndpoint(tmp_path / "tunnel", policy, interface="eftest0"))


def command(kind: str, args: dict[str, Any]) -> Command:
    now = int(time.time())
    return Command("c1", "dev-one", kind, args, now, now + 60)


def open_args(**over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "tunnel_id": "t-unit",
        "device_ip": "10.213.0.2",
        "engineer_ip": "10.213.0.3",
        "hub_ip": "10.213.0.1",
        "hub_public_key": generate_keypair().public_key,
        "hub_endpoint": "203.0.113.1:51820",
        "ports": [1880],
        "expires_at": time.time() + 600,
        "mtu": 1280,
        "keepalive": 15,
    }
    args.update(over)
    return args


def no_progress(_state: str, _detail: str | None) -> None:
    raise AssertionError("no progress expected")


def test_refusals_touch_nothing(tmp_path: Path, no_tools: None) -> None:
    off = commands(tmp_path, TunnelPolicy())
    result = off.open(command("tunnel.open", open_args()), no_progress).data()
    assert result["state"] == "refused" and "disabled on this machine" in result["detail"]
    limited = commands(tmp_path, TunnelPolicy(allowed=True, allowed_ports=frozenset({1880})))
    result = limited.open(command("tunnel.open", open_args(ports=[1880, 22])), no_progress).data()
    assert result == {
        "state": "refused",
        "detail": "ports [22] are not allowed for support tunnels on this machine; "
        "the owner allows [1880]",
        "tunnel_id": "t-unit",
    }
    malformed = limited.open(
        command("tunnel.open", open_args(hub_endpoint="nope")), no_progress
    ).data()
    assert malformed["state"] == "refused" and "HOST:PORT" in malformed["detail"]
    assert not (tmp_path / "tunnel").exists()  # no key, no state, no process


def test_connect_and_close_of_unknown_tunnels_say_so(tmp_path: Path, no_tools: None) -> None:
    handler = commands(tmp_path, TunnelPolicy(allowed=True, allowed_ports=frozenset({1880})))
    connect = handler.connect(
        command("tunnel.connect", {"tunnel_id": "t-other"}), no_progress
    ).data()
    assert connect == {
        "state": "failed",
        "detail": "tunnel t-other is not prepared here (expired or closed)",
    }
    close = handler.close(command("tunnel.close", {"tunnel_id": "t-other"}), no_progress).data()
    assert close == {"state": "succeeded", "detail": "tunnel t-other is not open here"}


def test_agent_starts_without_the_tools_and_cleans_up_a_stale_session(
    tmp_path: Path, no_tools: None
) -> None:
    fresh = commands(tmp_path, TunnelPolicy())
    fresh.start(agent=None)  # type: ignore[arg-type]  # the agent is not used
    assert not (tmp_path / "tunnel").exists()
    # It had a session (its state file says so), but nothing of it runs any more: cleaned up.
    state = tmp_path / "tunnel"
    state.mkdir()
    (state / "tunnel-eftest0.json").write_text('{"session": {}, "public_key": "x"}')
    commands(tmp_path, TunnelPolicy()).start(agent=None)  # type: ignore[arg-type]
    assert not (state / "tunnel-eftest0.json").exists()


def test_nft_missing_is_an_error_not_an_empty_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without nft on PATH, asking for a table must fail loudly, not say "no such table"."""
    from provisioning.nftables import nft_list_table
    from provisioning.wireguard.tools import WgCommandError

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(WgCommandError, match="not installed"):
        nft_list_table("inet", "edgefleet_anything")
