"""The command line of people and customers, as a customer-admin uses it against a running
gateway: log in (token kept mode 0600), claim a stock machine by the code its enrollment
printed, require and grant support consent, see it in the audit. The transcript is printed
(pytest -s shows it)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.accounts import TEST_PASSWORD, person_token
from tests.support.gateway_process import GatewayProcess, clean_env, edgefleet_command


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(tmp_path_factory.mktemp("gateway") / "data")
    gateway.start()
    yield gateway
    gateway.stop()


class Shell:
    """Runs `edgefleet ...` as one person: their own config dir, no EDGEFLEET_TOKEN."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = env
        self.transcript: list[str] = []

    def run(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        done = subprocess.run(
            [*edgefleet_command(), *args],
            env=clean_env({"XDG_CONFIG_HOME": str(self.home), **self.env}),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.transcript.append(f"$ edgefleet {' '.join(args)}\n{done.stdout}{done.stderr}")
        if check:
            assert done.returncode == 0, self.transcript[-1]
        return done.stdout


def test_customer_admin_claims_a_machine_and_grants_consent(
    gw: GatewayProcess, tmp_path: Path
) -> None:
    gw.cli("customers", "create", "Acme Foods")
    person_token(
        gw.url, gw.admin_token, "customer-admin", customer="Acme Foods", email="it@acme.example"
    )
    stock = gw.create_provisioning_token()
    factory = Shell(tmp_path / "factory", {})
    state = tmp_path / "machine"
    printed = factory.run(
        "agent",
        "enroll",
        "--gateway",
        gw.url,
        "--token",
        stock["token"],
        "--name",
        "press-07",
        "--state-dir",
        str(state),
    )
    code = (state / "claim-code.txt").read_text().strip()
    assert code in printed and stat.S_IMODE(os.stat(state / "claim-code.txt").st_mode) == 0o600

    it = Shell(tmp_path / "it-home", {"EDGEFLEET_GATEWAY": gw.url})
    it.run(
        "login",
        "--gateway",
        gw.url,
        "--email",
        "it@acme.example",
        "--password-stdin",
        stdin=TEST_PASSWORD + "\n",
    )
    kept = tmp_path / "it-home" / "edgefleet" / "credentials.json"
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600
    it.run("devices", "list")  # nothing of the stock is visible before the claim
    assert "press-07" not in it.transcript[-1]
    it.run("devices", "claim", code)
    it.run("devices", "show", "press-07")
    it.run("support", "require", "on")
    it.run("support", "status")
    assert "no window open" in it.transcript[-1]
    it.run("support", "grant", "--for", "24h", "--note", "ticket 4711")
    status = json.loads(it.run("support", "status", "--json"))
    assert status["open_now"] and status["active"]["granted_by"].startswith("it@acme.example [at-")
    it.run("audit", "--limit", "5")
    audit = json.loads(it.run("audit", "--json"))
    assert {"device.claim", "support.grant", "support.require"} <= {e["action"] for e in audit}
    assert all(e["customer_id"] == status["customer_id"] for e in audit)
    again = it.run("devices", "claim", code, check=False)
    assert again == "" and "404" in it.transcript[-1]
    it.run("logout")
    assert not kept.exists()
    print("\n".join(factory.transcript + it.transcript))
